/** Breaking qcow2 images on purpose for the check tests: the header fields, entries and refcounts they poke. */
import { open } from 'node:fs/promises';

/** Where an image's tables are, read from its header. */
export interface Layout {
  version: number;
  clusterBits: number;
  clusterSize: number;
  l1Offset: number;
  l1Size: number;
  refcountTableOffset: number;
  refcountOrder: number;
  extendedL2: boolean;
  fileSize: number;
}

/** Bits 9-55 of an L1/L2 entry: the host offset. */
export const OFFSET_MASK = 0x00fffffffffffe00n;
export const COPIED = 1n << 63n;
export const COMPRESSED = 1n << 62n;

async function readAt(file: string, offset: number, length: number): Promise<Buffer> {
  const handle = await open(file, 'r');
  try {
    const buf = Buffer.alloc(length);
    await handle.read(buf, 0, length, offset);
    return buf;
  } finally {
    await handle.close();
  }
}

/** Write `bytes` at `offset` of `file`. */
export async function writeAt(file: string, offset: number, bytes: Buffer): Promise<void> {
  const handle = await open(file, 'r+');
  try {
    await handle.write(bytes, 0, bytes.length, offset);
  } finally {
    await handle.close();
  }
}

export async function readLayout(file: string): Promise<Layout> {
  const h = await readAt(file, 0, 112);
  const version = h.readUInt32BE(4);
  const clusterBits = h.readUInt32BE(20);
  const handle = await open(file, 'r');
  const { size } = await handle.stat();
  await handle.close();
  return {
    version,
    clusterBits,
    clusterSize: 2 ** clusterBits,
    l1Size: h.readUInt32BE(36),
    l1Offset: Number(h.readBigUInt64BE(40)),
    refcountTableOffset: Number(h.readBigUInt64BE(48)),
    refcountOrder: version >= 3 ? h.readUInt32BE(96) : 4,
    extendedL2: version >= 3 && (h.readBigUInt64BE(72) & 16n) !== 0n,
    fileSize: size,
  };
}

export async function readU64(file: string, offset: number): Promise<bigint> {
  return (await readAt(file, offset, 8)).readBigUInt64BE(0);
}

export async function writeU64(file: string, offset: number, value: bigint): Promise<void> {
  const buf = Buffer.alloc(8);
  buf.writeBigUInt64BE(value);
  await writeAt(file, offset, buf);
}

/** File offset of the L1 entry mapping guest offset `guest`. */
export async function l1EntryOffset(file: string, guest: number): Promise<number> {
  const l = await readLayout(file);
  const l2Bits = l.clusterBits - (l.extendedL2 ? 4 : 3);
  return l.l1Offset + 8 * Math.floor(guest / 2 ** (l.clusterBits + l2Bits));
}

/** File offset of the L2 entry mapping guest offset `guest` (its L2 table must exist). */
export async function l2EntryOffset(file: string, guest: number): Promise<number> {
  const l = await readLayout(file);
  const l2 = Number((await readU64(file, await l1EntryOffset(file, guest))) & OFFSET_MASK);
  if (l2 === 0) throw new Error(`no L2 table maps guest offset ${guest}`);
  const entryBytes = l.extendedL2 ? 16 : 8;
  const l2Bits = l.clusterBits - (l.extendedL2 ? 4 : 3);
  return l2 + entryBytes * (Math.floor(guest / l.clusterSize) % 2 ** l2Bits);
}

/** The L2 entry of guest offset `guest`. */
export async function l2Entry(file: string, guest: number): Promise<bigint> {
  return readU64(file, await l2EntryOffset(file, guest));
}

/** Replace the L2 entry of `guest` by `change(entry)`. */
export async function changeL2Entry(file: string, guest: number, change: (entry: bigint) => bigint): Promise<void> {
  const at = await l2EntryOffset(file, guest);
  await writeU64(file, at, change(await readU64(file, at)));
}

/** Host cluster index holding the data of guest offset `guest`. */
export async function hostCluster(file: string, guest: number): Promise<number> {
  const l = await readLayout(file);
  return Number((await l2Entry(file, guest)) & OFFSET_MASK) / l.clusterSize;
}

/** Set the stored refcount of host cluster `cluster` (its refcount block must exist). */
export async function setRefcount(file: string, cluster: number, value: number): Promise<void> {
  const l = await readLayout(file);
  const bits = 2 ** l.refcountOrder;
  const perBlock = (l.clusterSize * 8) / bits;
  const block = Number((await readU64(file, l.refcountTableOffset + 8 * Math.floor(cluster / perBlock))) & ~0x1ffn);
  if (block === 0) throw new Error(`no refcount block holds cluster ${cluster}`);
  const index = cluster % perBlock;
  if (bits < 8) {
    const byteAt = block + Math.floor((index * bits) / 8);
    const shift = (index * bits) % 8;
    const mask = ((1 << bits) - 1) << shift;
    const byte = (await readAt(file, byteAt, 1))[0];
    await writeAt(file, byteAt, Buffer.from([(byte & ~mask) | ((value << shift) & mask)]));
    return;
  }
  const bytes = bits / 8;
  const buf = Buffer.alloc(bytes);
  let v = BigInt(value);
  for (let i = bytes - 1; i >= 0; i--) {
    buf[i] = Number(v & 0xffn);
    v >>= 8n;
  }
  await writeAt(file, block + index * bytes, buf);
}

/** File offset of refcount table entry `index`. */
export async function refcountTableEntryOffset(file: string, index: number): Promise<number> {
  return (await readLayout(file)).refcountTableOffset + 8 * index;
}

/** Set bits in the incompatible feature field (dirty 1, corrupt 2). */
export async function setIncompatibleBits(file: string, bits: bigint): Promise<void> {
  await writeU64(file, 72, (await readU64(file, 72)) | bits);
}

/** The bitmap directory entries' table offsets and flag fields (offsets of the flags), from the bitmaps extension. */
export async function bitmapDirectory(file: string): Promise<{ tableOffset: number; flagsAt: number }[]> {
  const l = await readLayout(file);
  const header = await readAt(file, 0, l.clusterSize);
  let at = header.readUInt32BE(100);
  while (at + 8 <= header.length) {
    const type = header.readUInt32BE(at);
    const length = header.readUInt32BE(at + 4);
    if (type === 0) break;
    if (type === 0x23852875) {
      const nb = header.readUInt32BE(at + 8);
      const dirSize = Number(header.readBigUInt64BE(at + 16));
      const dirOffset = Number(header.readBigUInt64BE(at + 24));
      const dir = await readAt(file, dirOffset, dirSize);
      const out = [];
      let p = 0;
      for (let i = 0; i < nb; i++) {
        out.push({ tableOffset: Number(dir.readBigUInt64BE(p)), flagsAt: dirOffset + p + 12 });
        p += Math.ceil((24 + dir.readUInt32BE(p + 20) + dir.readUInt16BE(p + 18)) / 8) * 8;
      }
      return out;
    }
    at += 8 + Math.ceil(length / 8) * 8;
  }
  return [];
}
