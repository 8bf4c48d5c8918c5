/**
 * The parent side of the fuzz tests: a child process (fuzz-child.js) runs each case,
 * so that a native crash or a hang becomes a failed case with its description instead of a dead
 * test worker. A crashed or hung child is replaced for the next case.
 */
import { ChildProcess, fork } from 'node:child_process';
import path from 'node:path';

import type { FuzzProgress, FuzzReport, FuzzRequest, StepOutcome } from './fuzz-child.js';

/** How a case ended, as the parent saw it. */
export interface CaseResult {
  outcomes: StepOutcome[];
  /** Empty when the library kept its promises; else what went wrong, case-independent wording. */
  problems: string[];
  writeSide?: FuzzReport['writeSide'];
}

const CHILD_SCRIPT = path.join(__dirname, 'fuzz-child.js');

/** At most this many cases run at once in the whole test file, so a busy machine does not fake hangs. */
const CONCURRENT_CASES = 2;
let running = 0;
const waiting: (() => void)[] = [];

async function acquireSlot(): Promise<void> {
  if (running < CONCURRENT_CASES) {
    running++;
    return;
  }
  await new Promise<void>((resolve) => waiting.push(resolve));
}

function releaseSlot(): void {
  const next = waiting.shift();
  if (next) next();
  else running--;
}

/** One child process, run one case at a time. */
export class FuzzChild {
  #child: ChildProcess | undefined;
  #stderr = '';
  #nextId = 1;
  /** Unhandled rejections reported between cases: they belong to the case before, so the next result carries them. */
  #stray: string[] = [];

  /** `hangAfterMs`: a case that takes longer is a hang (the child is killed and the case fails). */
  constructor(readonly hangAfterMs: number) {}

  #spawn(): ChildProcess {
    this.#stderr = '';
    const child = fork(CHILD_SCRIPT, [], { stdio: ['ignore', 'ignore', 'pipe', 'ipc'] });
    child.stderr!.on('data', (chunk: Buffer) => {
      this.#stderr = (this.#stderr + chunk.toString()).slice(-4000);
    });
    return child;
  }

  /** Run one case; resolves with its outcomes, or with a problem when the child crashed or hung. */
  async run(request: Omit<FuzzRequest, 'id'>): Promise<CaseResult> {
    await acquireSlot();
    try {
      return await this.#runInChild({ ...request, id: this.#nextId++ });
    } finally {
      releaseSlot();
    }
  }

  #runInChild(request: FuzzRequest): Promise<CaseResult> {
    const child = (this.#child ??= this.#spawn());
    let step = '(before the first step)';
    return new Promise<CaseResult>((resolve) => {
      const finish = (result: CaseResult) => {
        clearTimeout(timer);
        child.off('message', onMessage);
        child.off('close', onExit);
        resolve(result);
      };
      const lost = (problem: string) => {
        this.#child = undefined;
        const stderr = this.#stderr.trim();
        finish({ outcomes: [], problems: [`${problem} during step '${step}'${stderr ? `; its stderr:\n${stderr}` : ''}`] });
      };
      const onMessage = (message: FuzzProgress | FuzzReport | { problem: string }) => {
        if ('problem' in message) {
          this.#stray.push(message.problem);
          return;
        }
        if (message.id !== request.id) return;
        if ('done' in message) finish({ outcomes: message.outcomes, problems: [...this.#stray.splice(0), ...message.problems], writeSide: message.writeSide });
        else step = message.step;
      };
      // 'close', not 'exit': it comes after the IPC channel is drained, so the last step's name has arrived.
      const onExit = (code: number | null, signal: NodeJS.Signals | null) => {
        lost(`the child process died (${signal ? `signal ${signal}` : `exit code ${code}`})`);
      };
      const timer = setTimeout(() => {
        child.off('close', onExit);
        child.kill('SIGKILL');
        lost(`no answer within ${this.hangAfterMs / 1000} s (a hang)`);
      }, this.hangAfterMs);
      child.on('message', onMessage);
      child.on('close', onExit);
      child.send(request);
    });
  }

  /** Stop the child process. */
  close(): void {
    this.#child?.kill();
    this.#child = undefined;
  }
}
