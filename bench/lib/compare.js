'use strict';
/** Side-by-side timing of two commands (ours and qemu-img's), alternated within one run. */
const { dropCaches, runMeasured, shellQuote, toArgv } = require('./proc.js');
const { median, maximum } = require('./stats.js');

/** Results of one side: every run's wall time, the median, the peak RSS over all runs, and the first failure. */
function emptySide(command) {
  return { command: shellQuote(toArgv(command)), wallMs: [], cpuMs: [], peakRssKiB: [], medianMs: NaN, medianCpuMs: NaN, maxRssKiB: NaN, failed: false, error: '' };
}

/** The first meaningful lines of a failed run's stderr, or its exit status. */
function describeFailure(result) {
  const text = result.stderr.trim().split('\n').slice(0, 3).join(' | ');
  const status = result.signal ? `signal ${result.signal}` : `exit ${result.code}`;
  return text ? `${status}: ${text}` : status;
}

/**
 * Run `ours` and `theirs` `runs` times each, alternating (the side that goes first swaps every round
 * so drift in the machine hits both equally). A side that fails is not run again; the other goes on.
 * Options: runs (5), dropCaches (false), before (async hook run before every timed run, untimed),
 * afterDrop (async hook run after the page cache was dropped, untimed: e.g. to load the programs back),
 * stdout ('ignore', a file path, or { ours, theirs } paths), watch (see runMeasured), check (async (side, result) => error string or '' after each run),
 * log (function for progress lines).
 * Resolves { ours, theirs, ratio } where ratio = median(ours) / median(theirs).
 */
async function compareCommands(ours, theirs, options = {}) {
  const runs = options.runs ?? 5;
  const log = options.log ?? (() => {});
  const sides = { ours: emptySide(ours), theirs: emptySide(theirs) };
  const commands = { ours, theirs };
  let cachesDropped = options.dropCaches ? true : null;
  for (let round = 0; round < runs; round++) {
    const order = round % 2 === 0 ? ['ours', 'theirs'] : ['theirs', 'ours'];
    for (const name of order) {
      const side = sides[name];
      if (side.failed) continue;
      if (options.before) await options.before(name);
      if (options.dropCaches && !dropCaches()) cachesDropped = false;
      if (options.afterDrop) await options.afterDrop(name);
      const result = await runMeasured(commands[name], { stdout: options.stdout?.[name] ?? options.stdout, watch: options.watch });
      let error = result.code === 0 ? '' : describeFailure(result);
      if (!error && options.check) error = await options.check(name, result);
      if (error) {
        side.failed = true;
        side.error = error;
        log(`  ${name} run ${round + 1}: FAILED ${error}`);
        continue;
      }
      side.wallMs.push(result.wallMs);
      side.peakRssKiB.push(result.peakRssKiB);
      side.cpuMs.push(result.cpuMs);
      log(`  ${name} run ${round + 1}: ${(result.wallMs / 1000).toFixed(3)} s, CPU ${(result.cpuMs / 1000).toFixed(2)} s, peak RSS ${(result.peakRssKiB / 1024).toFixed(1)} MiB`);
    }
  }
  for (const side of Object.values(sides)) {
    side.medianMs = median(side.wallMs);
    side.medianCpuMs = median(side.cpuMs);
    side.maxRssKiB = maximum(side.peakRssKiB);
  }
  const ratio = sides.ours.failed || sides.theirs.failed ? NaN : sides.ours.medianMs / sides.theirs.medianMs;
  return { ours: sides.ours, theirs: sides.theirs, ratio, cachesDropped };
}

module.exports = { compareCommands };
