// Runs ava over the compiled tests and ends with the plain line "N passed, N failed".
// ava's TAP reporter gives exact counts; a run that executes no test is a failure.
import { spawn } from 'node:child_process';
import path from 'node:path';
import readline from 'node:readline';
import { fileURLToPath } from 'node:url';

const root = path.dirname(path.dirname(fileURLToPath(import.meta.url)));
const ava = path.join(root, 'node_modules', 'ava', 'entrypoints', 'cli.mjs');
const child = spawn(process.execPath, [ava, '--tap', ...process.argv.slice(2)], {
  stdio: ['inherit', 'pipe', 'inherit'],
});

// The totals ava prints at the end; if ava dies before them, the per-test lines seen so far.
const counts = { pass: 0, fail: 0, skip: 0, todo: 0 };
const seen = { pass: 0, fail: 0, skip: 0, todo: 0 };
let totals = false;
const lines = readline.createInterface({ input: child.stdout });
lines.on('line', (line) => {
  process.stdout.write(line + '\n');
  const total = /^# (pass|fail|skip|todo)\s+(\d+)/.exec(line);
  if (total) {
    counts[total[1]] = Number(total[2]);
    totals = true;
  }
  const result = /^(ok|not ok) \d+ /.exec(line);
  if (result) {
    const kind = / # SKIP/.test(line) ? 'skip' : / # TODO/.test(line) ? 'todo' : result[1] === 'ok' ? 'pass' : 'fail';
    seen[kind]++;
  }
});

child.on('close', (code) => {
  if (!totals) Object.assign(counts, seen);
  const failed = counts.fail + (code !== 0 && counts.fail === 0 ? 1 : 0);
  let summary = `${counts.pass} passed, ${failed} failed`;
  if (counts.skip + counts.todo > 0) summary += `, ${counts.skip + counts.todo} skipped`;
  process.stdout.write(summary + '\n');
  if (counts.pass === 0) process.stderr.write('no test was executed: that is a failure\n');
  process.exit(code === 0 && counts.pass > 0 && counts.fail === 0 ? 0 : 1);
});
