/** Test helpers: temporary folders, and the oracle (qemu-img, qemu-io) run as child processes. */
import { execFile } from 'node:child_process';
import { mkdtemp, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';

import type { ExecutionContext } from 'ava';

const run = promisify(execFile);

/** Where tests make their files: a disk-backed folder (O_DIRECT works there), not tmpfs. */
export const TEST_ROOT = process.env.QCOW2_TEST_DIR ?? os.tmpdir();

/** A fresh folder removed when the test ends. */
export async function tempDir(t: ExecutionContext): Promise<string> {
  const dir = await mkdtemp(path.join(TEST_ROOT, 'qcow2-test-'));
  t.teardown(() => rm(dir, { recursive: true, force: true }));
  return dir;
}

export interface RunResult {
  stdout: string;
  stderr: string;
  code: number;
}

/** Run a program; never throws for a non-zero exit (the code is returned). A missing program throws. */
export async function runProgram(program: string, args: string[], options: { cwd?: string } = {}): Promise<RunResult> {
  try {
    const { stdout, stderr } = await run(program, args, { maxBuffer: 1 << 30, encoding: 'utf8', cwd: options.cwd });
    return { stdout, stderr, code: 0 };
  } catch (error) {
    const e = error as { code?: unknown; stdout?: string; stderr?: string };
    if (typeof e.code !== 'number') throw error;
    return { stdout: e.stdout ?? '', stderr: e.stderr ?? '', code: e.code };
  }
}

/** Run qemu-img; a non-zero exit throws with its stderr. */
export async function qemuImg(...args: string[]): Promise<string> {
  const r = await runProgram('qemu-img', args);
  if (r.code !== 0) throw new Error(`qemu-img ${args.join(' ')} exited ${r.code}: ${r.stderr}`);
  return r.stdout;
}

/** Run qemu-io; throws on a non-zero exit or on output that reports a failure. */
export async function qemuIo(...args: string[]): Promise<string> {
  const r = await runProgram('qemu-io', args);
  if (r.code !== 0 || /failed|error/i.test(r.stdout + r.stderr)) {
    throw new Error(`qemu-io ${args.join(' ')} exited ${r.code}: ${r.stdout}${r.stderr}`);
  }
  return r.stdout;
}

/** The path of the compiled CLI. */
export const CLI = path.join(__dirname, '..', '..', 'ts', 'cli', 'main.js');

/** Run our CLI with node; returns stdout, stderr and the exit code. */
export function qcow2Cli(...args: string[]): Promise<RunResult> {
  return runProgram(process.execPath, [CLI, ...args]);
}

/** Deterministic pseudo-random bytes (xorshift), so that failures reproduce. */
export function patternBytes(length: number, seed: number): Buffer {
  const out = Buffer.alloc(length);
  let x = (seed * 2654435761) >>> 0 || 1;
  for (let i = 0; i < length; i++) {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    out[i] = x & 0xff;
  }
  return out;
}

/** qemu-img map --output=json without host offsets, runs that continue each other merged: each allocator places clusters its own way. */
export async function mapShape(file: string): Promise<string> {
  const entries = JSON.parse(await qemuImg('map', '--output=json', file)) as Record<string, unknown>[];
  const runs: Record<string, unknown>[] = [];
  for (const { offset: _offset, ...entry } of entries) {
    const last = runs[runs.length - 1];
    const same = last && ['depth', 'present', 'zero', 'data'].every((k) => last[k] === entry[k]);
    if (same && (last.start as number) + (last.length as number) === entry.start) last.length = (last.length as number) + (entry.length as number);
    else runs.push(entry);
  }
  return JSON.stringify(runs);
}

/** What qemu-img info says of an image's header: backing file and format, size, flags, format-specific facts. */
export async function headerFacts(file: string): Promise<Record<string, unknown>> {
  const info = JSON.parse(await qemuImg('info', '--output=json', '-U', file)) as Record<string, unknown>;
  const specific = (info['format-specific'] as { data?: Record<string, unknown> } | undefined)?.data ?? {};
  return {
    backing: info['backing-filename'],
    backingFormat: info['backing-filename-format'],
    size: info['virtual-size'],
    dirty: info['dirty-flag'],
    compat: specific.compat,
    lazy: specific['lazy-refcounts'],
    refcountBits: specific['refcount-bits'],
    dataFile: specific['data-file'],
    dataFileRaw: specific['data-file-raw'],
  };
}
