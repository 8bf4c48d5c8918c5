'use strict';
/** Micro benchmarks of qcow2 reads through the library (Image.read), on a fully allocated and a compressed image. */
const { GiB, MiB, compressedQcow2, fullQcow2 } = require('../lib/fixtures.js');
const { inFlight, randomOffsets } = require('../lib/runner.js');

const READS = 4096;

/** Reads of `length` bytes at random aligned offsets of `image`, `depth` in flight. */
function randomReads(native, image, length, depth, seed) {
  const offsets = randomOffsets(READS, image.size, length, length, seed);
  const buffers = Array.from({ length: depth }, () => native.allocAligned(length));
  return () => inFlight(READS, depth, (i) => image.read(buffers[i % depth], offsets[i]));
}

/** The whole image read in 1 MiB requests, `depth` in flight. */
function sequentialReads(native, image, depth) {
  const buffers = Array.from({ length: depth }, () => native.allocAligned(MiB));
  const count = Math.floor(image.size / MiB);
  return () => inFlight(count, depth, (i) => image.read(buffers[i % depth], i * MiB));
}

async function suite({ pkg, native, log }) {
  const full = await pkg.open(await fullQcow2(GiB, log), { readOnly: true, cache: 'none' });
  const compressed = await pkg.open(await compressedQcow2(256 * MiB, 'zstd', log), { readOnly: true, cache: 'none' });
  const defs = [
    { name: 'qcow2 read 4 KiB random, depth 16', ops: READS, bytes: READS * 4096, fn: randomReads(native, full, 4096, 16, 3) },
    { name: 'qcow2 read 4 KiB random, depth 1', ops: READS, bytes: READS * 4096, iterations: 3, fn: randomReads(native, full, 4096, 1, 3) },
    { name: 'qcow2 read 64 KiB random, depth 16', ops: READS, bytes: READS * 65536, fn: randomReads(native, full, 65536, 16, 4) },
    { name: 'qcow2 read 1 MiB sequential, depth 4 (1 GiB)', ops: 1024, bytes: GiB, iterations: 5, fn: sequentialReads(native, full, 4) },
    {
      name: 'qcow2 zstd read 1 MiB sequential, depth 4 (256 MiB)',
      ops: 256,
      bytes: 256 * MiB,
      iterations: 5,
      fn: sequentialReads(native, compressed, 4),
    },
  ];
  return {
    defs,
    async teardown() {
      await full.close();
      await compressed.close();
    },
  };
}

module.exports = { name: 'qcow2', suite };
