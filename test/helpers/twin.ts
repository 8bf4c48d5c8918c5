/** Running qemu-img and our CLI side by side, each in its own folder, so that their outputs can be compared verbatim. */
import { execFile } from 'node:child_process';
import { mkdir } from 'node:fs/promises';
import path from 'node:path';

import { CLI, RunResult } from './qemu.js';

/** Run `program` in `cwd`; a non-zero exit is returned, not thrown. */
export function runIn(cwd: string, program: string, args: string[]): Promise<RunResult> {
  return new Promise((resolve, reject) => {
    execFile(program, args, { cwd, encoding: 'utf8', maxBuffer: 1 << 26 }, (error, stdout, stderr) => {
      if (error && typeof error.code !== 'number') reject(error);
      else resolve({ stdout, stderr, code: error ? (error.code as number) : 0 });
    });
  });
}

/** Two folders under `dir`: 'theirs' where qemu-img runs, 'ours' where our CLI runs. */
export async function twinDirs(dir: string): Promise<{ theirs: string; ours: string }> {
  const theirs = path.join(dir, 'theirs');
  const ours = path.join(dir, 'ours');
  await mkdir(theirs, { recursive: true });
  await mkdir(ours, { recursive: true });
  return { theirs, ours };
}

/** Both runs of one command line, stderr with the program name replaced by "PROG". */
export interface TwinResult {
  theirs: RunResult;
  ours: RunResult;
}

/** Run `qemu-img ARGS` in dirs.theirs and `qcow2 ARGS` in dirs.ours. */
export async function runTwin(dirs: { theirs: string; ours: string }, args: string[]): Promise<TwinResult> {
  const [theirs, ours] = await Promise.all([
    runIn(dirs.theirs, 'qemu-img', args),
    runIn(dirs.ours, process.execPath, [CLI, ...args]),
  ]);
  // qemu-img ends one message ("Detected format of …") without a newline; ours ends every message with one.
  if (theirs.stderr !== '' && !theirs.stderr.endsWith('\n')) theirs.stderr += '\n';
  theirs.stderr = theirs.stderr.replace(/^qemu-img: /gm, 'PROG: ').replace("Try 'qemu-img --help'", "Try 'PROG --help'");
  ours.stderr = ours.stderr.replace(/^qcow2: /gm, 'PROG: ').replace("Try 'qcow2 --help'", "Try 'PROG --help'");
  return { theirs, ours };
}
