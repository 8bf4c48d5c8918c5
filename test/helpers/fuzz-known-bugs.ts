/**
 * Native bugs the write-side fuzzing found and reported (see the fuzz helper's report), which
 * the cases `npm test` runs must not hit until they are fixed: each is recognised from the mutated
 * bytes, so only the cases that would hit it are left out. QCOW2_FUZZ_KNOWN_BUGS=1 (set by
 * `npm run fuzz`) keeps them in. Remove an entry when its bug is fixed.
 */
import { OFFSET_MASK } from './fuzz-layout.js';

/** Keep the cases that hit known bugs. */
export const INCLUDE_KNOWN_BUGS = process.env.QCOW2_FUZZ_KNOWN_BUGS === '1';

/** Refcount table entries at or past this offset make check -r all size its refcount array by them. */
const HUGE_REFCOUNT_BLOCK_OFFSET = 2n ** 36n;

/** The refcount table entries the mutated file holds (as far as it holds them). */
function refcountTableEntries(bytes: Buffer): bigint[] {
  if (bytes.length < 64) return [];
  const offset = bytes.readBigUInt64BE(48);
  const clusterBits = bytes.readUInt32BE(20);
  if (clusterBits < 9 || clusterBits > 21 || offset >= BigInt(bytes.length)) return [];
  const end = Math.min(bytes.length, Number(offset) + bytes.readUInt32BE(56) * 2 ** clusterBits);
  const entries: bigint[] = [];
  for (let at = Number(offset); at + 8 <= end; at += 8) entries.push(bytes.readBigUInt64BE(at));
  return entries;
}

/**
 * Writes that allocate hang for ever when the first refcount table entry is 0: the engine places
 * the missing refcount block on cluster 0 and the entry still reads 0 (Refcounts::Allocate/MakeBlock).
 */
export function hitsAllocationHang(bytes: Buffer): boolean {
  const entries = refcountTableEntries(bytes);
  return !INCLUDE_KNOWN_BUGS && entries.length > 0 && (entries[0] & OFFSET_MASK) === 0n;
}

/**
 * check -r all sizes its reference counts by a refcount table entry that points terabytes away
 * (ReferenceCounts::Resize): std::bad_alloc kills the process, or it fills gigabytes of memory.
 */
export function hitsRepairBadAlloc(bytes: Buffer): boolean {
  return !INCLUDE_KNOWN_BUGS && refcountTableEntries(bytes).some((e) => (e & OFFSET_MASK) >= HUGE_REFCOUNT_BLOCK_OFFSET);
}
