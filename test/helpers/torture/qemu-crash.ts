/**
 * Rounds in which qemu-io, not our library, writes the image and then kills itself with SIGKILL
 * (`sigraise 9`) after a seeded number of steps. With lazy refcounts this leaves the image dirty
 * the way a crashed QEMU leaves it, so that our check and our refcount rebuild meet real dirty
 * images. The steps are the same seeded stream our child runs, written with the same bytes.
 */
import { spawn } from 'node:child_process';
import { mkdir, rm, writeFile } from 'node:fs/promises';
import path from 'node:path';

import { Geometry, Op, opData, steps } from './ops.js';
import { below, random } from './random.js';
import type { RoundLog } from './verify.js';

/** The qemu-io command for one operation; data comes from a file holding exactly its bytes. */
async function command(op: Op, dataDir: string): Promise<string> {
  switch (op.kind) {
    case 'write':
    case 'compressed': {
      const file = path.join(dataDir, `op${op.index}`);
      await writeFile(file, opData(op)!);
      return `write ${op.kind === 'compressed' ? '-c ' : ''}-s ${file} ${op.offset} ${op.length}`;
    }
    case 'zero':
      return `write -z ${op.unmap ? '-u ' : ''}${op.offset} ${op.length}`;
    case 'discard':
      return `discard ${op.offset} ${op.length}`;
    case 'flush':
      return 'flush';
    case 'grow':
      throw new Error('qemu-io rounds do not grow the disk');
  }
}

/** Run a round through qemu-io; it dies by SIGKILL after a seeded number of steps. Returns the log our child would have written. */
export async function qemuCrashRound(image: string, seed: number, size: number, geometry: Geometry, dir: string): Promise<RoundLog> {
  const dataDir = path.join(dir, 'qemu-data');
  await mkdir(dataDir, { recursive: true });
  const count = 1 + below(random(seed ^ 0x5151), 60);
  const commands: string[] = [];
  const log: RoundLog = { lastIssued: -1, lastFlush: -1 };
  let done = 0;
  for (const step of steps(seed, size, geometry, true)) {
    if (done++ === count) break;
    for (const op of step) {
      commands.push('-c', await command(op, dataDir));
      log.lastIssued = op.index;
      if (op.kind === 'flush') log.lastFlush = op.index;
    }
  }
  const { signal, output } = await runQemuIo(['-f', 'qcow2', ...commands, '-c', 'sigraise 9', image]);
  await rm(dataDir, { recursive: true, force: true });
  if (signal !== 'SIGKILL' || /error|failed/i.test(output)) {
    throw new Error(`qemu-io did not run its steps and die by SIGKILL (signal ${signal}): ${output.slice(-2000)}`);
  }
  return log;
}

function runQemuIo(args: string[]): Promise<{ signal: string | null; output: string }> {
  return new Promise((resolve, reject) => {
    const child = spawn('qemu-io', args, { stdio: ['ignore', 'pipe', 'pipe'] });
    let output = '';
    const collect = (chunk: Buffer) => (output = (output + chunk.toString()).slice(-20000));
    child.stdout.on('data', collect);
    child.stderr.on('data', collect);
    child.on('error', reject);
    child.on('close', (_code, signal) => resolve({ signal, output }));
  });
}
