'use strict';
/** Child processes for benchmarks: command parsing, timed runs with peak memory, page-cache drops. */
const { spawn, spawnSync } = require('node:child_process');
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');

/**
 * The package to measure: the repository (bench/lib/..), or a frozen copy made by bench/snapshot.js
 * named by QCOW2_BENCH_ROOT, so that a rebuild in the checkout cannot pull the addon away mid-run.
 */
const ROOT = process.env.QCOW2_BENCH_ROOT ? path.resolve(process.env.QCOW2_BENCH_ROOT) : path.resolve(__dirname, '..', '..');
/** Our CLI, compiled by tsc. */
const CLI = path.join(ROOT, 'dist', 'ts', 'cli', 'main.js');
const GNU_TIME = '/usr/bin/time';

/** Split a command line the way a POSIX shell splits words (quotes and backslashes; no expansions). */
function splitCommand(line) {
  const words = [];
  let word = null;
  let quote = null;
  for (let i = 0; i < line.length; i++) {
    const c = line[i];
    if (quote === "'") {
      if (c === "'") quote = null;
      else word += c;
    } else if (quote === '"') {
      if (c === '"') quote = null;
      else if (c === '\\' && i + 1 < line.length && '"\\$`'.includes(line[i + 1])) word += line[++i];
      else word += c;
    } else if (c === "'" || c === '"') {
      quote = c;
      word = word ?? '';
    } else if (c === '\\' && i + 1 < line.length) {
      word = (word ?? '') + line[++i];
    } else if (/\s/.test(c)) {
      if (word !== null) words.push(word);
      word = null;
    } else {
      word = (word ?? '') + c;
    }
  }
  if (quote) throw new Error(`unterminated ${quote} quote in: ${line}`);
  if (word !== null) words.push(word);
  return words;
}

/** Turn a leading `qcow2` into `node dist/ts/cli/main.js`; other programs are left as they are. */
function resolveCommand(argv) {
  if (argv.length === 0) throw new Error('empty command');
  return argv[0] === 'qcow2' ? [process.execPath, CLI, ...argv.slice(1)] : argv;
}

/** Accept a command as a string (split like a shell would) or as an argv array. */
function toArgv(command) {
  return resolveCommand(typeof command === 'string' ? splitCommand(command) : command);
}

/** True when GNU time (with -f and -o) is installed; it reports peak RSS from wait4(). */
const hasGnuTime = (() => {
  try {
    return spawnSync(GNU_TIME, ['-f', '%M', 'true'], { stdio: 'ignore' }).status === 0;
  } catch {
    return false;
  }
})();

let timeFileSeq = 0;

/**
 * Run a command to completion and measure it.
 * Resolves { wallMs, peakRssKiB, cpuMs, code, signal, stdout, stderr }; never rejects for a failing command.
 * `stdout` is 'ignore' (default), 'capture', or a file path to write it to. `watch`, when given, is
 * polled every 500 ms and kills the command when it returns a reason (e.g. the disk filling up).
 */
function runMeasured(command, options = {}) {
  const argv = toArgv(command);
  const stdoutMode = options.stdout ?? 'ignore';
  const timeFile = hasGnuTime ? path.join(os.tmpdir(), `qcow2-bench-time-${process.pid}-${timeFileSeq++}`) : null;
  const full = timeFile ? [GNU_TIME, '-f', '%M %U %S', '-o', timeFile, ...argv] : argv;
  let outFd = null;
  let stdio;
  if (stdoutMode === 'ignore') stdio = ['ignore', 'ignore', 'pipe'];
  else if (stdoutMode === 'capture') stdio = ['ignore', 'pipe', 'pipe'];
  else {
    outFd = fs.openSync(stdoutMode, 'w');
    stdio = ['ignore', outFd, 'pipe'];
  }
  return new Promise((resolve) => {
    const start = process.hrtime.bigint();
    // Its own process group, so a watchdog can kill the command together with GNU time.
    const child = spawn(full[0], full.slice(1), { stdio, env: options.env ?? process.env, cwd: options.cwd, detached: true });
    let killedFor = '';
    const watchdog = options.watch
      ? setInterval(() => {
          const reason = options.watch();
          if (reason && !killedFor) {
            killedFor = reason;
            try {
              process.kill(-child.pid, 'SIGKILL');
            } catch {
              // it has just exited
            }
          }
        }, 500)
      : null;
    const stdout = [];
    const stderr = [];
    child.stdout?.on('data', (d) => stdout.push(d));
    child.stderr.on('data', (d) => stderr.push(d));
    const poller = timeFile ? null : pollPeakRss(child.pid);
    child.on('error', (error) => {
      if (watchdog) clearInterval(watchdog);
      if (outFd !== null) fs.closeSync(outFd);
      resolve({ wallMs: NaN, peakRssKiB: NaN, cpuMs: NaN, code: -1, signal: null, stdout: '', stderr: String(error.message) });
    });
    child.on('close', (code, signal) => {
      const wallMs = Number(process.hrtime.bigint() - start) / 1e6;
      if (watchdog) clearInterval(watchdog);
      if (outFd !== null) fs.closeSync(outFd);
      const { peakRssKiB, cpuMs } = timeFile ? readTimeFile(timeFile) : { peakRssKiB: poller.stop(), cpuMs: NaN };
      const err = (killedFor ? `killed by the watchdog: ${killedFor}\n` : '') + Buffer.concat(stderr).toString('utf8');
      resolve({ wallMs, peakRssKiB, cpuMs, code: code ?? -1, signal, stdout: Buffer.concat(stdout).toString('utf8'), stderr: err });
    });
  });
}

/**
 * Peak RSS (KiB) and CPU time (user + system, ms) from GNU time's output file, whose last line is
 * "%M %U %S" (a "Command exited with non-zero status N" line may come before it).
 */
function readTimeFile(file) {
  try {
    const lines = fs.readFileSync(file, 'utf8').trim().split('\n');
    fs.rmSync(file, { force: true });
    const [rss, user, sys] = lines[lines.length - 1].split(' ').map(Number);
    return { peakRssKiB: rss, cpuMs: (user + sys) * 1000 };
  } catch {
    return { peakRssKiB: NaN, cpuMs: NaN };
  }
}

/** Without GNU time: poll VmHWM of the child every 5 ms (misses only the last few ms of its life). */
function pollPeakRss(pid) {
  let peak = NaN;
  const sample = () => {
    try {
      const m = /VmHWM:\s+(\d+) kB/.exec(fs.readFileSync(`/proc/${pid}/status`, 'utf8'));
      if (m) peak = Math.max(Number.isNaN(peak) ? 0 : peak, Number(m[1]));
    } catch {
      // the process has already exited
    }
  };
  const timer = setInterval(sample, 5);
  return {
    stop() {
      clearInterval(timer);
      return peak;
    },
  };
}

/** Run a command and throw with its stderr when it fails; resolves its stdout. For building fixtures. */
function runChecked(command, options = {}) {
  const argv = toArgv(command);
  return new Promise((resolve, reject) => {
    const child = spawn(argv[0], argv.slice(1), { stdio: ['pipe', 'pipe', 'pipe'], cwd: options.cwd });
    const out = [];
    const err = [];
    child.stdout.on('data', (d) => out.push(d));
    child.stderr.on('data', (d) => err.push(d));
    child.on('error', reject);
    child.on('close', (code, signal) => {
      const stdout = Buffer.concat(out).toString('utf8');
      const stderr = Buffer.concat(err).toString('utf8');
      if (code === 0) resolve(stdout);
      else reject(new Error(`${argv.join(' ')} exited ${code ?? signal}: ${stderr.trim() || stdout.trim().slice(-2000)}`));
    });
    if (options.input !== undefined) child.stdin.end(options.input);
    else child.stdin.end();
  });
}

/** Drop the page cache (needs root). Resolves true when it worked. */
function dropCaches() {
  spawnSync('sync');
  try {
    fs.writeFileSync('/proc/sys/vm/drop_caches', '3\n');
    return true;
  } catch {
    return false;
  }
}

/** Quote an argv for display, so a printed command can be pasted into a shell. */
function shellQuote(argv) {
  return argv.map((a) => (/^[\w@%+=:,./-]+$/.test(a) ? a : `'${a.replace(/'/g, `'\\''`)}'`)).join(' ');
}

/**
 * Delete `file` and let the disk settle (untimed): on a file system mounted with `discard`, freeing
 * a large, fragmented output sends thousands of discards at the next journal commit, and they
 * would otherwise land on whichever command runs next. `sync` forces that commit; the pause lets
 * the discards drain.
 */
async function removeAndSettle(file, pauseMs = 5000) {
  const existed = fs.existsSync(file);
  fs.rmSync(file, { force: true });
  if (!existed) return;
  spawnSync('sync', [], { stdio: 'ignore' });
  await new Promise((resolve) => setTimeout(resolve, pauseMs));
}

module.exports = { ROOT, CLI, hasGnuTime, splitCommand, resolveCommand, toArgv, runMeasured, runChecked, dropCaches, shellQuote, removeAndSettle };
