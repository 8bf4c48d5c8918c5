/** `qcow2 snapshot [-U] [-q] [-l | -a snapshot | -c snapshot | -d snapshot] filename`: qemu-img snapshot. */
import { constants } from 'node:os';

import { Qcow2Error, asQcow2Error } from '../errors.js';
import type { Image } from '../image.js';
import { openMetadataFile } from '../qcow2/metadata-file.js';
import { encodeName } from '../qcow2/text.js';
import { rawProbeWarning } from '../tools/io/probe-guard.js';
import { applySnapshot, createSnapshot, deleteSnapshot, listSnapshots, openForSnapshots } from '../tools/snapshot.js';
import { HELP_HINT, UsageError, parseArgs, qemuUsage } from './args.js';
import { snapshotTable } from './qemu-format.js';

const USAGE = `usage: qcow2 snapshot [--object objectdef] [--image-opts] [-U] [-q] [-l | -a snapshot | -c snapshot | -d snapshot] filename

List, create, apply or delete internal snapshots, as qemu-img snapshot does.
  -l                    list the snapshots
  -c NAME               create a snapshot of the current state named NAME
  -a NAME               make the current state the one of the snapshot with ID or name NAME
  -d NAME               delete the (first) snapshot named NAME
  -q                    quiet (accepted; these actions print nothing but errors)
  -U, --force-share     only with -l (no locks are taken)
`;

const SPEC = {
  short: 'la:c:d:hqU',
  long: {
    help: { value: false, key: 'h' },
    object: { value: true },
    'image-opts': { value: false },
    'force-share': { value: false, key: 'U' },
  },
};

type Action = { kind: 'list' } | { kind: 'create' | 'apply' | 'delete'; name: string };

const ACTION_LETTERS = { l: 'list', c: 'create', a: 'apply', d: 'delete' } as const;

/** The one action asked for, qemu-img's "Cannot mix" when several are, none when none is (qemu-img then does nothing). */
function actionOf(options: Map<string, string[]>): Action | undefined {
  let action: Action | undefined;
  let given = 0;
  for (const [letter, kind] of Object.entries(ACTION_LETTERS)) {
    const values = options.get(letter) ?? [];
    given += values.length;
    if (values.length === 0) continue;
    action = kind === 'list' ? { kind } : { kind, name: values[values.length - 1] };
  }
  if (given > 1) throw new UsageError(`Cannot mix '-l', '-a', '-c', '-d'${HELP_HINT}`);
  return action;
}

function parse(argv: string[]) {
  let args;
  try {
    args = parseArgs(argv, SPEC);
  } catch (error) {
    throw error instanceof UsageError ? qemuUsage(error, argv) : error;
  }
  if (args.options.has('object')) throw new UsageError('--object is not supported');
  if (args.options.has('image-opts')) throw new UsageError('--image-opts is not supported');
  return { args, action: actionOf(args.options) };
}

/** C's strerror() text of the errno names a snapshot creation can fail with, for qemu-img's "-N (text)". */
const STRERROR: Record<string, string> = {
  EINVAL: 'Invalid argument',
  ENOTSUP: 'Operation not supported',
  EFBIG: 'File too large',
  ENOSPC: 'No space left on device',
  EIO: 'Input/output error',
  ENOMEM: 'Cannot allocate memory',
  EROFS: 'Read-only file system',
};

/** How qemu-img words the reason a snapshot creation failed: "-22 (Invalid argument)", else the message. */
function createFailure(error: Qcow2Error): string {
  const errno = (constants.errno as Record<string, number>)[error.code];
  const text = STRERROR[error.code];
  return errno !== undefined && text !== undefined ? `-${errno} (${text})` : error.message;
}

/** The image opened as qemu-img snapshot opens it; failures read "Could not open 'PATH': REASON". */
async function openTarget(path: string, readOnly: boolean, forceShare: boolean): Promise<Image> {
  if (forceShare && !readOnly) {
    throw new Qcow2Error('EINVAL', `Could not open '${path}': force-share=on can only be used with read-only images`);
  }
  try {
    // A file that cannot be opened is named as qemu-img names it ("Could not open 'PATH': No such file or directory").
    await (await openMetadataFile(path)).handle.close();
    return await openForSnapshots(path, { followFileNames: true }, readOnly);
  } catch (error) {
    const cause = asQcow2Error(error);
    throw new Qcow2Error(cause.code, `Could not open '${path}': ${cause.message}`, { cause });
  }
}

/** The list qemu-img snapshot -l prints: nothing without snapshots. */
async function printList(image: Image): Promise<void> {
  // qemu reads the snapshot table when it opens the image: a bad one fails the open.
  const entries = await listSnapshots(image).catch((error: unknown) => {
    const cause = asQcow2Error(error);
    throw new Qcow2Error(cause.code, `Could not open '${image.path}': ${cause.message}`, { cause });
  });
  if (entries.length === 0) return;
  const rows = entries.map((e) => ({ id: e.id, name: e.name, vmStateSize: e.vmStateSize, dateSec: e.dateSec, vmClockNsec: e.vmClockNsec, icount: e.icount }));
  // Names are written as the bytes the image stores, like qemu-img does.
  process.stdout.write(encodeName(['Snapshot list:', ...snapshotTable(rows)].join('\n') + '\n'));
}

/** Run the action; a failure becomes qemu-img's "Could not <verb> snapshot 'NAME': REASON". */
async function change(image: Image, action: Exclude<Action, { kind: 'list' }>): Promise<void> {
  const { kind, name } = action;
  try {
    if (kind === 'create') await createSnapshot(image, name);
    else if (kind === 'apply') await applySnapshot(image, name);
    else await deleteSnapshot(image, name);
  } catch (error) {
    const cause = asQcow2Error(error);
    let reason = cause.message;
    if (kind === 'create') reason = createFailure(cause);
    else if (cause.code === 'ENOENT') reason = kind === 'apply' ? 'Failed to load snapshot: No such file or directory' : 'snapshot not found';
    else if (cause.code === 'ENOTSUP') reason = 'Operation not supported';
    else if (cause.code === 'EBUSY') reason = 'Device has active dirty bitmaps';
    throw new Qcow2Error(cause.code, `Could not ${kind} snapshot '${name}': ${reason}`, { cause });
  }
}

/** Run `qcow2 snapshot`; errors propagate to main, which prints them qemu-img style and exits 1. */
export async function run(argv: string[]): Promise<number> {
  const { args, action } = parse(argv);
  if (args.options.has('h')) {
    process.stdout.write(USAGE);
    return 0;
  }
  if (args.positional.length !== 1) throw new UsageError(`Expecting one image file name${HELP_HINT}`);
  const path = args.positional[0];
  // qemu-img opens the image writable unless it lists (even when no action is given).
  const readOnly = action?.kind === 'list';
  const image = await openTarget(path, readOnly, args.options.has('U'));
  try {
    if (image.format === 'raw' && !readOnly) process.stderr.write(rawProbeWarning(path));
    if (action?.kind === 'list') await printList(image);
    else if (action) await change(image, action);
  } finally {
    await image.close();
  }
  return 0;
}
