/** `qcow2 info [-f FMT] [--output=human|json] [--backing-chain] [-U] IMG`: qemu-img info's output. */
import { encodeName } from '../qcow2/text.js';
import { ImageInfo, info, infoChain } from '../tools/info.js';
import { HELP_HINT, UsageError, lastOption, parseArgs, qemuUsage } from './args.js';
import { dumpNested, qemuJson, QemuJsonValue, sizeToStr, snapshotTable } from './qemu-format.js';

const USAGE = `usage: qcow2 info [--object objectdef] [--image-opts] [-f fmt] [--output=ofmt] [--backing-chain] [-U] filename

Show information about a disk image, as qemu-img info does.
  -f, --format FMT      image format (raw, qcow2); probed when left out
  --output=human|json   output format (default human)
  --backing-chain       show the whole backing chain
  -U, --force-share     accepted for compatibility (no locks are taken)
`;

/** Everything qemu-img info shows for one image, as text lines. */
export function humanInfo(image: ImageInfo): string[] {
  const lines = [
    `image: ${image.filename}`,
    `file format: ${image.format}`,
    `virtual size: ${sizeToStr(image['virtual-size'])} (${image['virtual-size']} bytes)`,
    `disk size: ${image['actual-size'] === undefined ? 'unavailable' : sizeToStr(image['actual-size'])}`,
  ];
  if (image['cluster-size'] !== undefined) lines.push(`cluster_size: ${image['cluster-size']}`);
  if (image['dirty-flag']) lines.push('cleanly shut down: no');
  const backing = image['backing-filename'];
  if (backing !== undefined) {
    const full = image['full-backing-filename'];
    lines.push(`backing file: ${backing}${full !== undefined && full !== backing ? ` (actual path: ${full})` : ''}`);
    if (image['backing-filename-format'] !== undefined) lines.push(`backing file format: ${image['backing-filename-format']}`);
  }
  if (image.snapshots) {
    lines.push('Snapshot list:');
    lines.push(
      ...snapshotTable(
        image.snapshots.map((s) => ({
          id: s.id,
          name: s.name,
          vmStateSize: s['vm-state-size'],
          dateSec: s['date-sec'],
          vmClockNsec: BigInt(s['vm-clock-sec']) * 1_000_000_000n + BigInt(s['vm-clock-nsec']),
          icount: s.icount,
        })),
      ),
    );
  }
  const specific = image['format-specific'];
  if (specific) {
    lines.push('Format specific information:');
    lines.push(...dumpNested(specific.data as unknown as { [key: string]: QemuJsonValue }, 4));
  }
  return lines;
}

const INFO_SPEC = {
  short: 'f:hU',
  long: {
    help: { value: false, key: 'h' },
    format: { value: true, key: 'f' },
    output: { value: true },
    'backing-chain': { value: false },
    object: { value: true },
    'image-opts': { value: false },
    'force-share': { value: false, key: 'U' },
  },
};

function parseInfoArgs(argv: string[]) {
  let args;
  try {
    args = parseArgs(argv, INFO_SPEC);
  } catch (error) {
    throw error instanceof UsageError ? qemuUsage(error, argv) : error;
  }
  const output = lastOption(args, 'output') ?? 'human';
  if (output !== 'human' && output !== 'json') throw new UsageError('--output must be used with human or json as argument.');
  if (args.options.has('object')) throw new UsageError('--object is not supported');
  if (args.options.has('image-opts')) throw new UsageError('--image-opts is not supported');
  return { args, output, help: args.options.has('h') };
}

/** Run `qcow2 info`; errors propagate to main, which prints them qemu-img style and exits 1. */
export async function run(argv: string[]): Promise<number> {
  const { args, output, help } = parseInfoArgs(argv);
  if (help) {
    process.stdout.write(USAGE);
    return 0;
  }
  if (args.positional.length !== 1) {
    throw new UsageError(`Expecting one image file name${HELP_HINT}`);
  }
  const path = args.positional[0];
  const options = {
    format: lastOption(args, 'f'),
    // qemu-img 7.2 ends this hint without a newline; the output keeps that byte for byte.
    onWarning: (message: string) =>
      process.stderr.write(`qcow2: warning: ${message}\nSome clusters may be leaked, run 'qcow2 check -r' on the image file to fix.`),
  };
  const chain = args.options.has('backing-chain') ? await infoChain(path, options) : [await info(path, options)];
  if (output === 'json') {
    const value = args.options.has('backing-chain') ? chain : chain[0];
    process.stdout.write(qemuJson(value as unknown as QemuJsonValue) + '\n');
  } else {
    // Names are written as the bytes the image stores, like qemu-img does.
    process.stdout.write(encodeName(chain.map((image) => humanInfo(image).join('\n') + '\n').join('\n')));
  }
  return 0;
}
