'use strict';
/** Checks the scenario scripts share on their parsed options. */

/** Refuse `--only` ids outside `known` (what they are called: "scenario", "workload"), and a count option that is not a positive integer. */
function checkScenarioOptions(options, { known, what, countName, count }) {
  const unknown = options.only.filter((id) => !known.includes(id));
  if (unknown.length) throw new Error(`unknown ${what} ${unknown.join(', ')} (known: ${known.join(', ')})`);
  if (!Number.isSafeInteger(count) || count <= 0) throw new Error(`${countName} needs a positive integer, got ${count}`);
  return options;
}

module.exports = { checkScenarioOptions };
