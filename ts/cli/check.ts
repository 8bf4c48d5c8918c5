/** `qcow2 check [-f FMT] [--output=human|json] [-r leaks|all] [-T CACHE] [-q] IMG`: qemu-img check's output and exit codes. */
import { asQcow2Error, Qcow2Error } from '../errors.js';
import { CheckResult, RepairMode, check, checkExitCode } from '../tools/check.js';
import { rawProbeWarning } from '../tools/io/probe-guard.js';
import { HELP_HINT, UsageError, lastOption, parseArgs, qemuUsage } from './args.js';
import { parseCache, parseFormat } from './common.js';
import { qemuJson } from './qemu-format.js';

const SPEC = {
  short: 'hf:r:T:qU',
  long: {
    help: { value: false, key: 'h' },
    output: { value: true },
    object: { value: true },
    'image-opts': { value: false },
    'force-share': { value: false, key: 'U' },
  },
};

const USAGE = 'usage: qcow2 check [--object objectdef] [--image-opts] [-q] [-f fmt] [--output=ofmt] [-r [leaks | all]] [-T src_cache] [-U] filename\n';

function parseRepair(text: string | undefined): RepairMode | undefined {
  if (text === undefined) return undefined;
  if (text !== 'leaks' && text !== 'all') {
    throw new UsageError(`Unknown option value for -r (expecting 'leaks' or 'all'): ${text}${HELP_HINT}`);
  }
  return text;
}

/** printf's "%0.2f": like toFixed(2), except that an exact tie rounds to even. */
function percent(value: number): string {
  const eighths = value * 8;
  if (Number.isInteger(eighths) && eighths % 2 === 1) {
    const down = Math.floor(value * 100);
    const pick = down % 2 === 0 ? down : down + 1;
    return (pick / 100).toFixed(2);
  }
  return value.toFixed(2);
}

/** The human summary qemu-img check prints on stdout. */
export function humanCheck(r: CheckResult): string {
  let out = '';
  if (!r.corruptions && !r.leaks && !r.checkErrors) {
    out += 'No errors were found on the image.\n';
  } else {
    if (r.corruptions) out += `\n${r.corruptions} errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.\n`;
    if (r.leaks) out += `\n${r.leaks} leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.\n`;
    if (r.checkErrors) out += `\n${r.checkErrors} internal errors have occurred during the check.\n`;
  }
  const total = r.totalClusters ?? 0;
  const allocated = r.allocatedClusters ?? 0;
  if (total && allocated) {
    out +=
      `${allocated}/${total} = ${percent((allocated * 100) / total)}% allocated, ` +
      `${percent(((r.fragmentedClusters ?? 0) * 100) / allocated)}% fragmented, ` +
      `${percent(((r.compressedClusters ?? 0) * 100) / allocated)}% compressed clusters\n`;
  }
  if (r.imageEndOffset) out += `Image end offset: ${r.imageEndOffset}\n`;
  return out;
}

/** The JSON qemu-img check prints: its keys in qemu's dictionary order, zero optional counters left out. */
export function jsonCheck(r: CheckResult): string {
  const nonZero = (v: number | undefined) => (v ? v : undefined);
  return (
    qemuJson({
      'image-end-offset': nonZero(r.imageEndOffset),
      'compressed-clusters': nonZero(r.compressedClusters),
      'total-clusters': nonZero(r.totalClusters),
      corruptions: nonZero(r.corruptions),
      'corruptions-fixed': nonZero(r.corruptionsFixed),
      'check-errors': r.checkErrors,
      leaks: nonZero(r.leaks),
      'leaks-fixed': nonZero(r.leaksFixed),
      'allocated-clusters': nonZero(r.allocatedClusters),
      filename: r.filename,
      format: r.format,
      'fragmented-clusters': nonZero(r.fragmentedClusters),
    }) + '\n'
  );
}

function parseCheckArgs(argv: string[]) {
  let args;
  try {
    args = parseArgs(argv, SPEC);
  } catch (error) {
    throw error instanceof UsageError ? qemuUsage(error, argv) : error;
  }
  if (args.options.has('h')) return { help: true as const };
  if (args.options.has('object')) throw new UsageError('--object is not supported');
  if (args.options.has('image-opts')) throw new UsageError('--image-opts is not supported');
  const repair = parseRepair(lastOption(args, 'r'));
  if (args.positional.length !== 1) throw new UsageError(`Expecting one image file name${HELP_HINT}`);
  const output = lastOption(args, 'output') ?? 'human';
  if (output !== 'human' && output !== 'json') throw new UsageError('--output must be used with human or json as argument.');
  const outputFormat: 'human' | 'json' = output;
  const cache = parseCache(lastOption(args, 'T'), 'source cache');
  return {
    help: false as const,
    file: args.positional[0],
    format: parseFormat(lastOption(args, 'f')),
    repair,
    output: outputFormat,
    cache,
    quiet: args.options.has('q'),
  };
}

/** What the command prints and its exit code. */
export interface CheckOutput {
  stdout: string;
  stderr: string;
  code: number;
}

/** qemu-img check's output for a result: messages on stderr, the summary (human or JSON) on stdout. */
export function renderCheck(
  file: string,
  result: CheckResult,
  options: { output: 'human' | 'json'; quiet?: boolean; repair?: RepairMode; formatGiven?: boolean },
): CheckOutput {
  let stdout = '';
  let stderr = '';
  const say = (text: string) => {
    if (!options.quiet) stdout += text;
  };
  const code = checkExitCode(result);
  if (code === 63) {
    if (options.repair && !options.formatGiven) stderr += rawProbeWarning(file);
    return { stdout, stderr: stderr + 'qcow2: This image format does not support checks\n', code };
  }
  // qemu-img ends its open warnings without a newline; the output keeps that byte for byte.
  for (const warning of result.warnings ?? []) stderr += `qcow2: warning: ${warning}`;
  for (const message of result.messages) stderr += message + '\n';
  if ((result.corruptionsFixed || result.leaksFixed) && options.output === 'human') {
    say(
      'The following inconsistencies were found and repaired:\n\n' +
        `    ${result.leaksFixed} leaked clusters\n    ${result.corruptionsFixed} corruptions\n\n` +
        'Double checking the fixed image now...\n',
    );
  }
  if (result.failure === undefined) say(options.output === 'json' ? jsonCheck(result) : humanCheck(result));
  if (result.failure !== undefined) stderr += `qcow2: Check failed: ${result.failure}\n`;
  else if (result.checkErrors) stderr += 'qcow2: Check failed\n';
  return { stdout, stderr, code };
}

/** Run `qcow2 check`; resolves to qemu-img check's exit code. */
export async function run(argv: string[]): Promise<number> {
  const parsed = parseCheckArgs(argv);
  if (parsed.help) {
    process.stdout.write(USAGE);
    return 0;
  }
  const { file, format, repair, output, cache, quiet } = parsed;
  let result;
  try {
    result = await check(file, { format, repair, cache });
  } catch (error) {
    const cause = asQcow2Error(error);
    throw new Qcow2Error(cause.code, `Could not open '${file}': ${cause.message}`, { cause });
  }
  const out = renderCheck(file, result, { output, quiet, repair, formatGiven: format !== undefined });
  process.stderr.write(out.stderr);
  process.stdout.write(out.stdout);
  return out.code;
}
