'use strict';
/** Micro benchmarks of the file layer: NativeFile reads (aligned, unaligned, depths) and allocAligned. */
const { MiB, randomRaw } = require('../lib/fixtures.js');
const { inFlight, randomOffsets } = require('../lib/runner.js');

const FILE_SIZE = 1024 * MiB;
const READS = 4096;

/** `READS` reads of `length` bytes at `offsets[i] + shift`, `depth` in flight, each into its own buffer. */
function readBench(file, { length, depth, offsets, shift = 0, buffers }) {
  return () => inFlight(READS, depth, (i) => file.read(buffers[i % depth], offsets[i] + shift));
}

/** Buffers for `depth` concurrent reads: from the aligned pool, or deliberately misaligned by one byte. */
function makeBuffers(native, depth, length, aligned) {
  return Array.from({ length: depth }, () =>
    aligned ? native.allocAligned(length) : native.allocAligned(length + 4096).subarray(1, 1 + length),
  );
}

/** The suite: needs the compiled package; reads a 1 GiB random file in the bench folder with O_DIRECT. */
async function suite({ pkg, native, log }) {
  const path = await randomRaw(FILE_SIZE, log);
  const file = await native.NativeFile.open(path, { cache: 'none' });
  const offsets4k = randomOffsets(READS, FILE_SIZE, 4096, 4096, 1);
  const offsets64k = randomOffsets(READS, FILE_SIZE, 65536, 65536, 2);
  const image = await pkg.open(path, { readOnly: true, format: 'raw', cache: 'none' });
  const imageBuffers = makeBuffers(native, 16, 4096, true);
  const big = makeBuffers(native, 4, MiB, true);
  const defs = [
    {
      name: `NativeFile 4 KiB random read, depth 16 (direct=${file.info.direct})`,
      ops: READS,
      bytes: READS * 4096,
      fn: readBench(file, { length: 4096, depth: 16, offsets: offsets4k, buffers: makeBuffers(native, 16, 4096, true) }),
    },
    {
      name: 'NativeFile 4 KiB random read, depth 1',
      ops: READS,
      bytes: READS * 4096,
      iterations: 3,
      fn: readBench(file, { length: 4096, depth: 1, offsets: offsets4k, buffers: makeBuffers(native, 1, 4096, true) }),
    },
    {
      name: 'NativeFile 4 KiB read, unaligned offset (+1), depth 16',
      ops: READS,
      bytes: READS * 4096,
      fn: readBench(file, { length: 4096, depth: 16, offsets: offsets4k, shift: 1, buffers: makeBuffers(native, 16, 4096, true) }),
    },
    {
      name: 'NativeFile 4 KiB read, unaligned buffer, depth 16',
      ops: READS,
      bytes: READS * 4096,
      fn: readBench(file, { length: 4096, depth: 16, offsets: offsets4k, buffers: makeBuffers(native, 16, 4096, false) }),
    },
    {
      name: 'NativeFile 64 KiB random read, depth 16',
      ops: READS,
      bytes: READS * 65536,
      fn: readBench(file, { length: 65536, depth: 16, offsets: offsets64k, buffers: makeBuffers(native, 16, 65536, true) }),
    },
    {
      name: 'NativeFile 1 MiB sequential read, depth 4',
      ops: 1024,
      bytes: FILE_SIZE,
      iterations: 5,
      fn: () => inFlight(1024, 4, (i) => file.read(big[i % 4], i * MiB)),
    },
    {
      name: 'RawImage.read 4 KiB random, depth 16',
      ops: READS,
      bytes: READS * 4096,
      fn: () => inFlight(READS, 16, (i) => image.read(imageBuffers[i % 16], offsets4k[i])),
    },
    {
      name: 'allocAligned(4 KiB) x 10000',
      ops: 10000,
      fn: () => {
        for (let i = 0; i < 10000; i++) native.allocAligned(4096);
      },
    },
    {
      name: 'allocAligned(1 MiB) x 1000',
      ops: 1000,
      fn: () => {
        for (let i = 0; i < 1000; i++) native.allocAligned(MiB);
      },
    },
    {
      name: 'Buffer.allocUnsafe(1 MiB) x 1000 (reference)',
      ops: 1000,
      fn: () => {
        for (let i = 0; i < 1000; i++) Buffer.allocUnsafe(MiB);
      },
    },
  ];
  return {
    defs,
    async teardown() {
      await image.close();
      await file.close();
    },
  };
}

module.exports = { name: 'file', suite };
