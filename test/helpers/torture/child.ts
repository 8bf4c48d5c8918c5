/**
 * The torture child: opens one image through the library and runs a round's endless stream of
 * steps until the parent kills it. Before issuing an operation it logs `S index`; after a flush
 * is acknowledged it logs `F index`. Both are written synchronously, so the log survives SIGKILL
 * and tells the parent which operations were ever issued and which a completed flush covers.
 * Once the image is open it writes `ready` to stdout; any failure goes to stderr with exit code 1.
 */
import { openSync, writeSync } from 'node:fs';

import { Image, Qcow2Image, open } from '../../../ts/index.js';
import { Geometry, Op, opData, steps } from './ops.js';

/** What the parent tells the child (JSON in argv[2]). */
export interface ChildConfig {
  image: string;
  log: string;
  /** The round's seed: the same stream the parent replays. */
  seed: number;
  /** The disk size when the round starts. */
  size: number;
  geometry: Geometry;
}

async function runOp(image: Image, op: Op): Promise<void> {
  switch (op.kind) {
    case 'write':
      return image.write(opData(op)!, op.offset);
    case 'compressed':
      return (image as Qcow2Image).writeCompressed(opData(op)!, op.offset);
    case 'zero':
      return image.writeZeroes(op.offset, op.length, { unmap: op.unmap });
    case 'discard':
      return image.discard(op.offset, op.length);
    case 'flush':
      return image.flush();
    case 'grow':
      return (image as Qcow2Image).resize(op.size);
  }
}

async function main(config: ChildConfig): Promise<void> {
  const log = openSync(config.log, 'a');
  const image = await open(config.image, { followFileNames: true });
  writeSync(1, 'ready\n');
  for (const step of steps(config.seed, config.size, config.geometry)) {
    writeSync(log, step.map((op) => `S ${op.index}\n`).join(''));
    await Promise.all(step.map((op) => runOp(image, op)));
    if (step[0].kind === 'flush') writeSync(log, `F ${step[0].index}\n`);
  }
}

main(JSON.parse(process.argv[2]) as ChildConfig).catch((error: unknown) => {
  process.stderr.write(`torture child failed: ${(error as Error)?.stack ?? String(error)}\n`);
  process.exit(1);
});
