'use strict';
/** The bench folder (BENCH_DIR, default /tmp/qcow2-bench): images built once, cached by name and parameters. */
const crypto = require('node:crypto');
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');

/** Where scenario images live; must be on a disk (O_DIRECT), not tmpfs. */
const BENCH_DIR = process.env.BENCH_DIR ?? path.join(os.tmpdir(), 'qcow2-bench');

/** Make the bench folder (and a sub-folder) exist; returns its path. */
function benchPath(...parts) {
  const dir = path.join(BENCH_DIR, ...parts.slice(0, -1));
  fs.mkdirSync(dir, { recursive: true });
  return path.join(dir, parts[parts.length - 1]);
}

/** A short stable digest of build parameters, so a changed recipe builds a new file. */
function paramsKey(params) {
  return crypto.createHash('sha256').update(JSON.stringify(params)).digest('hex').slice(0, 10);
}

/**
 * The path of a cached artefact `name` built by `build(partPath)` from `params`. It is built into a
 * temporary name and renamed when complete, with a sidecar recording the parameters; a later call
 * with the same name and parameters reuses it.
 */
async function cached(name, ext, params, build, log = () => {}) {
  const file = benchPath(`${name}-${paramsKey(params)}.${ext}`);
  const stamp = `${file}.done.json`;
  if (fs.existsSync(file) && fs.existsSync(stamp)) return file;
  const part = `${file}.part`;
  fs.rmSync(part, { force: true });
  log(`building ${path.basename(file)} ${JSON.stringify(params)}`);
  const start = Date.now();
  await build(part);
  fs.renameSync(part, file);
  fs.writeFileSync(stamp, JSON.stringify({ params, builtIn: `${((Date.now() - start) / 1000).toFixed(1)} s` }) + '\n');
  log(`built ${path.basename(file)} in ${((Date.now() - start) / 1000).toFixed(1)} s`);
  return file;
}

/** Remove the bench folder and everything in it. */
function cleanBenchDir() {
  fs.rmSync(BENCH_DIR, { recursive: true, force: true });
}

/** Bytes of disk the bench folder occupies. */
function benchDirUsage() {
  let total = 0;
  const walk = (dir) => {
    if (!fs.existsSync(dir)) return;
    for (const entry of fs.readdirSync(dir, { withFileTypes: true })) {
      const p = path.join(dir, entry.name);
      if (entry.isDirectory()) walk(p);
      else total += fs.statSync(p).blocks * 512;
    }
  };
  walk(BENCH_DIR);
  return total;
}

module.exports = { BENCH_DIR, benchPath, paramsKey, cached, cleanBenchDir, benchDirUsage };
