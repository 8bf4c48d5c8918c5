'use strict';
/** Scenario images, built with qemu-img/qemu-io once and cached in the bench folder. */
const crypto = require('node:crypto');
const fs = require('node:fs');

const { cached } = require('./benchdir.js');
const { runChecked } = require('./proc.js');
const { prng } = require('./runner.js');

const MiB = 1 << 20;
const GiB = 1 << 30;

/** Write `size` bytes made by `fill(chunk, offset)` chunk by chunk (1 MiB at a time) to `file`. */
function writeGenerated(file, size, fill) {
  const fd = fs.openSync(file, 'w');
  try {
    const chunk = Buffer.alloc(MiB);
    for (let offset = 0; offset < size; offset += MiB) {
      const n = Math.min(MiB, size - offset);
      fill(chunk.subarray(0, n), offset);
      fs.writeSync(fd, chunk, 0, n, offset);
    }
  } finally {
    fs.closeSync(fd);
  }
}

/** A raw file of `size` random bytes. */
function randomRaw(size, log) {
  return cached('random', 'raw', { size }, async (part) => writeGenerated(part, size, (chunk) => crypto.randomFillSync(chunk)), log);
}

/** 32 KiB of text, so half of each half-compressible cluster compresses well but not to nothing. */
const TEXT = Buffer.from(
  Array.from({ length: 700 }, (_, i) => `line ${i}: the qcow2 benchmark writes text that compresses.\n`).join(''),
).subarray(0, 32 * 1024);

/** A raw file whose every 64 KiB cluster is 32 KiB of random bytes followed by 32 KiB of text. */
function halfCompressibleRaw(size, log) {
  return cached('half-compressible', 'raw', { size, text: TEXT.length }, async (part) => {
    writeGenerated(part, size, (chunk) => {
      for (let c = 0; c < chunk.length; c += 64 * 1024) {
        crypto.randomFillSync(chunk, c, 32 * 1024);
        TEXT.copy(chunk, c + 32 * 1024);
      }
    });
  }, log);
}

/** A fully allocated qcow2 (64 KiB clusters) of `size` random bytes, made by qemu-img convert from a raw file. */
function fullQcow2(size, log) {
  return cached('full', 'qcow2', { size, clusterSize: 65536 }, async (part) => {
    // A private random source, removed afterwards: a 4 GiB raw kept around would only cost disk.
    const raw = `${part}.source.raw`;
    try {
      writeGenerated(raw, size, (chunk) => crypto.randomFillSync(chunk));
      await runChecked(['qemu-img', 'convert', '-f', 'raw', '-O', 'qcow2', '-o', 'cluster_size=65536', raw, part]);
    } finally {
      fs.rmSync(raw, { force: true });
    }
  }, log);
}

/** A qcow2 of `size` half-compressible bytes, every cluster compressed with `type` (zlib or zstd). */
function compressedQcow2(size, type, log) {
  return cached(`compressed-${type}`, 'qcow2', { size, type }, async (part) => {
    const raw = await halfCompressibleRaw(size, log);
    await runChecked(['qemu-img', 'convert', '-c', '-f', 'raw', '-O', 'qcow2', '-o', `compression_type=${type}`, raw, part]);
  }, log);
}

/** The guest cluster indices of an aged image: `count` distinct random clusters, in shuffled order. */
function agedClusterOrder(clusters, count, seed) {
  const random = prng(seed);
  const index = new Uint32Array(clusters);
  for (let i = 0; i < clusters; i++) index[i] = i;
  // A partial Fisher-Yates shuffle: the first `count` slots are a random sample in random order.
  for (let i = 0; i < count; i++) {
    const j = i + Math.floor(random() * (clusters - i));
    const t = index[i];
    index[i] = index[j];
    index[j] = t;
  }
  return index.subarray(0, count);
}

/**
 * An "aged" qcow2: `fraction` of its 64 KiB clusters allocated at random guest offsets and written in
 * shuffled order, so guest order and host order disagree. Written with qemu-io, commands fed on stdin
 * in batches; each cluster gets a byte pattern (1..255) that depends on its index.
 */
function agedQcow2(size, fraction, log) {
  const clusterSize = 65536;
  const seed = 12345;
  return cached('aged', 'qcow2', { size, fraction, clusterSize, seed }, async (part) => {
    await runChecked(['qemu-img', 'create', '-q', '-f', 'qcow2', '-o', `cluster_size=${clusterSize}`, part, String(size)]);
    const order = agedClusterOrder(size / clusterSize, Math.round((size / clusterSize) * fraction), seed);
    const batch = 20000;
    for (let start = 0; start < order.length; start += batch) {
      const lines = [];
      for (const cluster of order.subarray(start, start + batch)) {
        lines.push(`write -q -P ${(cluster % 255) + 1} ${cluster * clusterSize} ${clusterSize}`);
      }
      const output = await runChecked(['qemu-io', '-t', 'unsafe', '-f', 'qcow2', part], { input: lines.join('\n') + '\n' });
      if (/failed|error/i.test(output)) throw new Error(`qemu-io failed building ${part}: ${output.slice(0, 500)}`);
      log(`  aged image: ${Math.min(start + batch, order.length)}/${order.length} clusters written`);
    }
  }, log);
}

module.exports = { MiB, GiB, randomRaw, halfCompressibleRaw, fullQcow2, compressedQcow2, agedQcow2, agedClusterOrder };
