// `npm run test:asan`: builds a second copy of the addon with AddressSanitizer and
// UndefinedBehaviorSanitizer into build-asan/ (./build stays untouched), then runs the tests that
// drive the native code (and the fuzz tests) against it. Any sanitizer report fails the run.
// Extra arguments replace the default list of test files.
import { spawn, spawnSync } from 'node:child_process';
import { chmodSync, copyFileSync, existsSync, mkdirSync, readdirSync, readFileSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const root = path.dirname(path.dirname(path.dirname(fileURLToPath(import.meta.url))));
const stage = path.join(root, 'build-asan');
const addon = path.join(stage, 'build', 'Release', 'qcow2_native.node');

/** The tests that exercise the addon: the file layer, the engine's read and write paths, hostile images, the fuzzers. */
const DEFAULT_TESTS = [
  'test/native-file.test.ts',
  'test/qcow2-read.test.ts',
  'test/qcow2-write.test.ts',
  'test/qcow2-hostile.test.ts',
  'test/convert-qcow2.test.ts',
  'test/resize.test.ts',
  'test/fuzz-read.test.ts',
  'test/fuzz-write.test.ts',
];

// -O1 keeps the run fast enough while the reports stay readable; -fno-sanitize-recover makes
// undefined behaviour abort like an ASan error instead of printing and going on.
const SANITIZE = '-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer -O1 -g';

function fail(message) {
  process.stderr.write(`test:asan: ${message}\n`);
  process.exit(1);
}

/** A shared library of the compiler's sanitizer runtimes, by name (gcc prints the bare name when it has none). */
function runtime(name) {
  const found = spawnSync('gcc', [`-print-file-name=${name}`], { encoding: 'utf8' });
  const file = found.stdout?.trim();
  if (found.status !== 0 || !file || !path.isAbsolute(file) || !existsSync(file)) fail(`gcc has no ${name}: install gcc's sanitizer runtimes`);
  return file;
}

/** node-gyp as npm runs it (npm sets npm_config_node_gyp and knows where Node's headers are). */
function nodeGyp() {
  const gyp = process.env.npm_config_node_gyp;
  if (!gyp) fail('run me through npm: npm run test:asan');
  return gyp;
}

/** The staging folder node-gyp builds in: the same binding.gyp and sources, its own build/. */
function stageSources() {
  mkdirSync(stage, { recursive: true });
  copyFileSync(path.join(root, 'binding.gyp'), path.join(stage, 'binding.gyp'));
  const native = path.join(stage, 'native');
  if (!existsSync(native)) symlinkSync(path.join('..', 'native'), native);
}

function buildAddon() {
  stageSources();
  const env = { ...process.env, CFLAGS: SANITIZE, CXXFLAGS: SANITIZE, LDFLAGS: '-fsanitize=address,undefined' };
  // The Makefile appends CFLAGS/CXXFLAGS after the flags of binding.gyp, so -O1 wins over its -O3.
  const built = spawnSync(process.execPath, [nodeGyp(), 'configure', 'build', '--jobs', 'max'], { cwd: stage, env, stdio: 'inherit' });
  if (built.status !== 0) fail(`node-gyp failed (exit ${built.status})`);
  const linked = spawnSync('ldd', [addon], { encoding: 'utf8' });
  if (!/libasan/.test(linked.stdout ?? '')) fail(`${addon} is not linked with libasan`);
}

/**
 * qemu-img and qemu-io are the tests' oracle, not under test: wrappers drop the sanitizer
 * runtime from their environment so that they run as they always do.
 */
function oracleWrappers() {
  const bin = path.join(stage, 'oracle-bin');
  mkdirSync(bin, { recursive: true });
  for (const program of ['qemu-img', 'qemu-io']) {
    const real = spawnSync('sh', ['-c', `command -v ${program}`], { encoding: 'utf8' }).stdout.trim();
    if (!real) fail(`${program} is not installed`);
    const wrapper = path.join(bin, program);
    writeFileSync(wrapper, `#!/bin/sh\nunset LD_PRELOAD\nexec ${real} "$@"\n`);
    chmodSync(wrapper, 0o755);
  }
  return bin;
}

/** Run the tests with the sanitizer runtime preloaded into every node process; resolves with the exit code and whether stderr showed a sanitizer report. */
function runTests(tests, logDir) {
  const env = {
    ...process.env,
    QCOW2_NATIVE_ADDON: addon,
    // node itself is not instrumented: the runtime must be loaded before anything else.
    LD_PRELOAD: runtime('libasan.so'),
    // detect_leaks=0: node and V8 keep allocations alive until exit on purpose, so LeakSanitizer
    // reports them in every process; leaks of the addon are not what this run looks for.
    // log_path: every ASan report lands in a file, so one from a child process (a fuzz child, a
    // CLI run whose failure a test expects) cannot go unnoticed. gcc's UBSan ignores log_path
    // beside ASan: its reports go to stderr (scanned below) and abort the process.
    // quarantine_size_mb: the default 256 MiB of freed memory held per process, times the twenty
    // fuzz children alive at once, would want more memory than a CI machine has.
    ASAN_OPTIONS: `detect_leaks=0:halt_on_error=1:abort_on_error=1:quarantine_size_mb=32:log_path=${path.join(logDir, 'asan')}`,
    UBSAN_OPTIONS: 'halt_on_error=1:abort_on_error=1:print_stacktrace=1',
    PATH: `${oracleWrappers()}${path.delimiter}${process.env.PATH}`,
  };
  return new Promise((resolve) => {
    const child = spawn(process.execPath, [path.join(root, 'test', 'run.mjs'), ...tests], { cwd: root, env, stdio: ['inherit', 'inherit', 'pipe'] });
    let reported = false;
    let tail = '';
    child.stderr.on('data', (chunk) => {
      process.stderr.write(chunk);
      tail = (tail + chunk.toString()).slice(-4096);
      reported ||= /runtime error:|ERROR: AddressSanitizer/.test(tail);
    });
    child.on('close', (code, signal) => resolve({ code: signal ? 128 : code, reported }));
  });
}

/** The sanitizer reports written during the run. */
function reports(logDir) {
  return readdirSync(logDir).map((name) => `--- ${name}\n${readFileSync(path.join(logDir, name), 'utf8')}`);
}

async function main() {
  const started = Date.now();
  buildAddon();
  const logDir = path.join(stage, 'reports');
  rmSync(logDir, { recursive: true, force: true });
  mkdirSync(logDir);
  const tests = process.argv.length > 2 ? process.argv.slice(2) : DEFAULT_TESTS;
  const { code, reported } = await runTests(tests, logDir);
  const found = reports(logDir);
  const seconds = Math.round((Date.now() - started) / 1000);
  if (found.length > 0) fail(`${found.length} sanitizer report(s):\n${found.join('\n')}`);
  if (reported) fail('a sanitizer report on stderr (above)');
  if (code !== 0) fail(`the tests failed (exit ${code}) after ${seconds} s`);
  process.stdout.write(`test:asan: no sanitizer report, tests passed, ${seconds} s\n`);
}

await main();
