#!/usr/bin/env node
'use strict';
/**
 * A read load through the library API, run as its own process so a crash cannot take the scenario down.
 *
 *   node bench/lib/readload.js IMAGE [--depth 16] [--size 4096] [--count N] [--pattern random|sequential]
 *
 * `sequential` steps by the request size from offset 0 and wraps, as `qemu-img bench` does; `random`
 * picks aligned offsets uniformly. The clock runs from the first request to the last completion (open
 * and process start are excluded, as in qemu-img bench). Prints one JSON line: { ops, ms, iops, mbps }.
 */
const path = require('node:path');

const { ROOT } = require('./proc.js');
const { prng } = require('./runner.js');

function parseCommandLine(argv) {
  const options = { image: '', depth: 16, size: 4096, count: 200000, pattern: 'random' };
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    if (arg === '--depth') options.depth = Number(argv[++i]);
    else if (arg === '--size') options.size = Number(argv[++i]);
    else if (arg === '--count') options.count = Number(argv[++i]);
    else if (arg === '--pattern') options.pattern = argv[++i];
    else if (!options.image) options.image = arg;
    else throw new Error(`unexpected argument '${arg}'`);
  }
  if (!options.image) throw new Error('usage: node bench/lib/readload.js IMAGE [--depth N] [--size BYTES] [--count N] [--pattern random|sequential]');
  for (const key of ['depth', 'size', 'count']) {
    if (!Number.isSafeInteger(options[key]) || options[key] <= 0) throw new Error(`--${key} needs a positive integer, got ${options[key]}`);
  }
  if (!['random', 'sequential'].includes(options.pattern)) throw new Error(`--pattern must be random or sequential, got '${options.pattern}'`);
  return options;
}

/** The offset of request `i`: a function of the pattern, the request size and the image size. */
function offsetSource(pattern, size, imageSize) {
  const slots = Math.floor(imageSize / size);
  if (pattern === 'sequential') return (i) => (i % slots) * size;
  const random = prng(7);
  return () => Math.floor(random() * slots) * size;
}

async function main() {
  const options = parseCommandLine(process.argv.slice(2));
  const pkg = require(path.join(ROOT, 'dist', 'ts', 'index.js'));
  const image = await pkg.open(options.image, { readOnly: true, cache: 'none' });
  try {
    const offsetOf = offsetSource(options.pattern, options.size, image.size);
    let next = 0;
    const worker = async (buffer) => {
      while (next < options.count) await image.read(buffer, offsetOf(next++));
    };
    const buffers = Array.from({ length: options.depth }, () => pkg.allocAligned(options.size));
    const start = process.hrtime.bigint();
    await Promise.all(buffers.map(worker));
    const ms = Number(process.hrtime.bigint() - start) / 1e6;
    const iops = (options.count / ms) * 1000;
    process.stdout.write(JSON.stringify({ ops: options.count, ms, iops, mbps: (iops * options.size) / 1e6 }) + '\n');
  } finally {
    await image.close();
  }
}

main().catch((error) => {
  process.stderr.write(`readload: ${error.message}\n`);
  process.exitCode = 1;
});
