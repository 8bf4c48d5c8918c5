/** `check`: qemu-img check (and check -r) for qcow2 images through the native walker. */
import { ErrorCodes, Qcow2Error, settle } from '../errors.js';
import { CACHE_MODES, CacheMode, NativeFile, Qcow2CheckReport, native } from '../native.js';
import { open, probeFormat } from '../open.js';
import { HEADER_FIELD_OFFSETS, MAX_SNAPSHOTS, Qcow2Header, parseHeader, readHeader } from '../qcow2/header.js';
import { errnoText, openMetadataFile, readRange } from '../qcow2/metadata-file.js';
import { MAX_SNAPSHOT_EXTRA_DATA, encodeSnapshotTable, readSnapshots } from '../qcow2/snapshots.js';
import { cString, combineFileName } from '../qcow2/text.js';
import { walkParams } from '../qcow2/walk.js';

/** What a check repairs, as qemu-img check -r: leaked clusters only, or everything it can. */
export type RepairMode = 'leaks' | 'all';

/** Options of check(), as qemu-img check's -f, -r and -T. */
export interface CheckOptions {
  /** The image format; probed when absent. */
  format?: 'qcow2' | 'raw';
  /** Repair leaks only, or everything that can be repaired (the image is opened writable). */
  repair?: RepairMode;
  /** Host cache mode (qemu-img's -T); default `writeback`. */
  cache?: CacheMode;
}

/** What qemu-img check reports for an image (after a repair: the double check, with the fixes counted). */
export interface CheckResult {
  filename: string;
  format: string;
  checkErrors: number;
  corruptions: number;
  leaks: number;
  corruptionsFixed: number;
  leaksFixed: number;
  imageEndOffset?: number;
  totalClusters?: number;
  allocatedClusters?: number;
  fragmentedClusters?: number;
  compressedClusters?: number;
  /** Human-readable lines describing each problem found, as qemu-img check prints them. */
  messages: string[];
  /** Warnings qemu-img prints on opening the image, before the check's own messages. */
  warnings?: string[];
  /** The check stopped early (qemu-img's "Check failed: REASON"): the reason, e.g. "Input/output error". */
  failure?: string;
}

function checkOptions(options: CheckOptions): void {
  const { format, repair, cache } = options;
  if (format !== undefined && format !== 'qcow2' && format !== 'raw') {
    throw new Qcow2Error(ErrorCodes.INVALID_ARGUMENT, `format must be 'qcow2' or 'raw', got '${String(format)}'`);
  }
  if (repair !== undefined && repair !== 'leaks' && repair !== 'all') {
    throw new Qcow2Error(ErrorCodes.INVALID_ARGUMENT, `repair must be 'leaks' or 'all', got '${String(repair)}'`);
  }
  if (cache !== undefined && !CACHE_MODES.includes(cache)) {
    throw new Qcow2Error(ErrorCodes.INVALID_ARGUMENT, `cache must be one of ${CACHE_MODES.join(', ')}, got '${String(cache)}'`);
  }
}

/** qemu's warning for bitmaps whose autoclear bit a program without bitmap support cleared. */
const IGNORED_BITMAPS =
  'a program lacking bitmap support modified this file, so all bitmaps are now considered inconsistent\n' +
  "Some clusters may be leaked, run 'qcow2 check -r' on the image file to fix.";

/** A failure to open a file the image names, worded like qemu's. */
function openFailure(error: unknown, prefix: string): Qcow2Error {
  const { code, text } = error instanceof Qcow2Error && !/^E[A-Z]+$/.test(error.code) ? { code: error.code, text: error.message } : errnoText(error);
  return new Qcow2Error(code, `${prefix}${text}`, { cause: error });
}

/** qemu-img check opens the image with its backing file and data file: a missing one fails the check the same way. */
async function openNamedFiles(path: string, header: Qcow2Header): Promise<void> {
  if (header.externalDataFile && header.dataFile !== undefined) {
    // qemu opens the data file by the name as stored: relative to the working directory, not the image.
    const dataPath = cString(header.dataFile);
    try {
      await (await settle(native.NativeFile.open(dataPath, { writable: false }))).close();
    } catch (error) {
      throw openFailure(error, `Could not open '${dataPath}': `);
    }
  }
  if (header.backingFile !== undefined) {
    const backingPath = combineFileName(path, cString(header.backingFile));
    try {
      const format = header.backingFormat === 'raw' || header.backingFormat === 'qcow2' ? header.backingFormat : undefined;
      await (await open(backingPath, { readOnly: true, format, followFileNames: true })).close();
    } catch (error) {
      throw openFailure(error, `Could not open backing file: Could not open '${backingPath}': `);
    }
  }
}

/** The largest cluster a qcow2 image may have (2 MiB): the header reads that far at most. */
const MAX_CLUSTER_SIZE = 2 * 1024 * 1024;

/** What qemu-img check finds in the snapshot table before counting references. */
interface SnapshotTableCheck {
  /** Entries qemu calls incomplete: each one a corruption. */
  incomplete: number[];
  /** Entries with too much extra data: the check fails, -r all cuts it (each one a corruption). */
  oversized: { index: number; size: number }[];
  /** The table -r all writes in place of the old one. */
  rewritten: Buffer;
}

async function readSnapshotTable(path: string, header: Qcow2Header): Promise<SnapshotTableCheck> {
  if (header.nbSnapshots === 0) return { incomplete: [], oversized: [], rewritten: Buffer.alloc(0) };
  const metadata = await openMetadataFile(path);
  try {
    const table = await readSnapshots(metadata, header, false);
    const diskSize = Math.floor(header.size / 512) * 512;
    return { incomplete: table.incompleteEntries, oversized: table.oversizedExtraData, rewritten: encodeSnapshotTable(table.entries, diskSize) };
  } finally {
    await metadata.handle.close();
  }
}

/** qemu-img check stops before counting references when a snapshot's extra data is over the bound and -r all is not asked. */
function oversizedFailure(index: number): Qcow2CheckReport {
  return {
    messages: [
      `qcow2: ERROR failed to read the snapshot table: Too much extra metadata in snapshot table entry ${index}`,
      'You can force-remove this extra metadata with qemu-img check -r all',
    ],
    checkErrors: 1,
    corruptions: 0,
    leaks: 0,
    corruptionsFixed: 0,
    leaksFixed: 0,
    imageEndOffset: 0,
    totalClusters: 0,
    allocatedClusters: 0,
    fragmentedClusters: 0,
    compressedClusters: 0,
    failure: 'File too large',
  };
}

/** qemu-img check without -r all stops before counting references when nb_snapshots is over the limit. */
function tooManySnapshotsFailure(nbSnapshots: number): Qcow2CheckReport {
  return {
    ...oversizedFailure(0),
    messages: [
      'qcow2: ERROR snapshot table too large',
      `You can force-remove all ${nbSnapshots - MAX_SNAPSHOTS} overhanging snapshots with qemu-img check -r all`,
    ],
  };
}

/**
 * The header as qemu-img check opens it: its open leaves the snapshot table to the check, so an
 * nb_snapshots over the limit is returned apart (the header then reads as having no snapshots).
 */
async function readCheckedHeader(path: string): Promise<{ header: Qcow2Header; nbSnapshotsOverLimit?: number }> {
  try {
    return { header: (await readHeader(path)).header };
  } catch (error) {
    const metadata = await openMetadataFile(path);
    try {
      const buf = await readRange(metadata, 0, Math.min(metadata.size, MAX_CLUSTER_SIZE), 'qcow2 header');
      const at = HEADER_FIELD_OFFSETS.nbSnapshots;
      if (buf.length < at + 4 || buf.readUInt32BE(at) <= MAX_SNAPSHOTS) throw error;
      const nbSnapshots = buf.readUInt32BE(at);
      buf.writeUInt32BE(0, at);
      return { header: parseHeader(buf, metadata.size), nbSnapshotsOverLimit: nbSnapshots };
    } finally {
      await metadata.handle.close();
    }
  }
}

/**
 * One pass over the image as its header says now (a repair may have moved the refcount table).
 * The snapshot table's problems come first, as qemu reads the table before counting references;
 * -r all rewrites the table with every entry complete once the refcounts are repaired.
 */
async function checkPass(path: string, file: NativeFile, repair: RepairMode | undefined): Promise<Qcow2CheckReport> {
  const { header } = await readHeader(path);
  const walk = await walkParams(path, header);
  const { incomplete, oversized, rewritten } = await readSnapshotTable(path, header);
  const fixTable = repair === 'all' && incomplete.length + oversized.length > 0;
  if (oversized.length > 0 && !fixTable) return oversizedFailure(oversized[0].index);
  const report = await settle(
    native.Qcow2Engine.check(file, {
      ...walk,
      ...(repair ? { repair } : {}),
      incompatibleFeatures: Number(header.incompatibleFeatures),
      ...(fixTable
        ? {
            snapshotTable: {
              bytes: rewritten,
              count: header.nbSnapshots,
              countField: HEADER_FIELD_OFFSETS.nbSnapshots,
              offsetField: HEADER_FIELD_OFFSETS.snapshotsOffset,
            },
          }
        : { otherCorruptions: incomplete.length }),
    }),
  );
  const messages = [
    ...oversized.map(({ index, size }) => `Discarding too much extra metadata in snapshot table entry ${index} (${size} > ${MAX_SNAPSHOT_EXTRA_DATA})`),
    ...incomplete.map((index) => `${fixTable ? 'Repairing' : 'ERROR'} snapshot table entry ${index} is incomplete`),
    ...report.messages,
  ];
  const found = incomplete.length + oversized.length;
  if (fixTable && report.failure === undefined) return { ...report, corruptionsFixed: report.corruptionsFixed + found, messages };
  return { ...report, corruptions: report.corruptions + found, messages };
}

function toResult(path: string, report: Qcow2CheckReport, fixed: Qcow2CheckReport, messages: string[]): CheckResult {
  const optional = (value: number) => (value !== 0 ? value : undefined);
  const result: CheckResult = {
    filename: path,
    format: 'qcow2',
    checkErrors: report.checkErrors,
    corruptions: report.corruptions,
    leaks: report.leaks,
    corruptionsFixed: fixed.corruptionsFixed,
    leaksFixed: fixed.leaksFixed,
    imageEndOffset: optional(report.imageEndOffset),
    totalClusters: optional(report.totalClusters),
    allocatedClusters: optional(report.allocatedClusters),
    fragmentedClusters: optional(report.fragmentedClusters),
    compressedClusters: optional(report.compressedClusters),
    messages,
  };
  if (report.failure !== undefined) result.failure = report.failure;
  for (const key of Object.keys(result) as (keyof CheckResult)[]) if (result[key] === undefined) delete result[key];
  return result;
}

/** Check (and with `repair`, repair) an image, like `qemu-img check [-r leaks|all]`. */
export async function check(path: string, options: CheckOptions = {}): Promise<CheckResult> {
  checkOptions(options);
  let format = options.format;
  try {
    format ??= await probeFormat(path);
  } catch (error) {
    throw openFailure(error, `Could not open '${path}': `);
  }
  if (format !== 'qcow2') {
    return { filename: path, format, checkErrors: 0, corruptions: 0, leaks: 0, corruptionsFixed: 0, leaksFixed: 0, messages: [] };
  }
  const { header, nbSnapshotsOverLimit } = await readCheckedHeader(path);
  await openNamedFiles(path, header);
  let file: NativeFile;
  try {
    file = await settle(native.NativeFile.open(path, { writable: options.repair !== undefined, cache: options.cache ?? 'writeback' }));
  } catch (error) {
    throw openFailure(error, `Could not open '${path}': `);
  }
  try {
    if (nbSnapshotsOverLimit !== undefined) {
      // qemu's -r all drops the overhanging entries, then fails rewriting the table: that repair is not done here.
      const report = tooManySnapshotsFailure(nbSnapshotsOverLimit);
      return toResult(path, report, report, report.messages);
    }
    const first = await checkPass(path, file, options.repair);
    let result;
    if (first.failure !== undefined || (first.corruptionsFixed === 0 && first.leaksFixed === 0)) {
      result = toResult(path, first, first, first.messages);
    } else if (first.unusable) {
      // qemu marked the image corrupt and dropped it during the repair: its double check cannot run.
      result = toResult(path, { ...first, failure: 'No medium found' }, first, first.messages);
    } else {
      // Like qemu-img: what was repaired is counted, and the result is that of a fresh check.
      const second = await checkPass(path, file, undefined);
      result = toResult(path, second, first, [...first.messages, ...second.messages]);
    }
    if (header.bitmaps && header.bitmaps.nbBitmaps > 0 && !header.bitmapsAutoclear) result.warnings = [IGNORED_BITMAPS];
    return result;
  } finally {
    await file.close();
  }
}

/** The exit code qemu-img check gives for a result: 0 clean, 1 check errors, 2 corruptions, 3 leaks only, 63 unsupported format. */
export function checkExitCode(result: CheckResult): number {
  if (result.format !== 'qcow2') return 63;
  if (result.failure !== undefined || result.checkErrors > 0) return 1;
  if (result.corruptions > 0) return 2;
  if (result.leaks > 0) return 3;
  return 0;
}
