#!/usr/bin/env node
'use strict';
/**
 * Freeze the built package (dist/ts, the addon, package.json) into DIR, so that benchmarks measure
 * one consistent build while the checkout keeps changing. Use it with QCOW2_BENCH_ROOT=DIR.
 *
 *   node bench/snapshot.js DIR && QCOW2_BENCH_ROOT=DIR node bench/scenarios/read-path.js
 */
const fs = require('node:fs');
const path = require('node:path');

const REPO = path.resolve(__dirname, '..');
const PARTS = [path.join('dist', 'ts'), path.join('build', 'Release', 'qcow2_native.node'), 'package.json'];

function main() {
  const dir = process.argv[2];
  if (!dir) throw new Error('usage: node bench/snapshot.js DIR');
  const target = path.resolve(dir);
  if (target === REPO) throw new Error('the snapshot folder must not be the repository itself');
  for (const part of PARTS) {
    const from = path.join(REPO, part);
    if (!fs.existsSync(from)) throw new Error(`${from} is missing: build the package first (npx tsc -p . and the addon)`);
  }
  fs.rmSync(target, { recursive: true, force: true });
  for (const part of PARTS) {
    fs.mkdirSync(path.dirname(path.join(target, part)), { recursive: true });
    fs.cpSync(path.join(REPO, part), path.join(target, part), { recursive: true });
  }
  const commit = require('node:child_process').spawnSync('git', ['-C', REPO, 'rev-parse', '--short', 'HEAD'], { encoding: 'utf8' }).stdout.trim();
  fs.writeFileSync(path.join(target, 'SNAPSHOT'), `${new Date().toISOString()} from ${REPO} at ${commit} (plus uncommitted changes)\n`);
  process.stdout.write(`snapshot of ${REPO} (HEAD ${commit}) in ${target}\n`);
}

try {
  main();
} catch (error) {
  process.stderr.write(`${error.message}\n`);
  process.exitCode = 1;
}
