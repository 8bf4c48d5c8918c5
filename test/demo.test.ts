/** The quick start: `npm start` runs the demo end to end; `qcow2 demo --keep DIR` leaves files that qemu-img accepts. */
import { spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdir, readdir, writeFile } from 'node:fs/promises';
import path from 'node:path';

import test from 'ava';

import { ProgressDisplay, formatBytes, formatSeconds } from '../ts/cli/demo.js';
import { DEMO_FILES, DEMO_STEPS, runDemo } from '../ts/tools/demo.js';
import { CLI, qcow2Cli, qemuImg, runProgram, tempDir } from './helpers/qemu.js';

const ROOT = path.join(__dirname, '..', '..');

/** The folder the demo says it removed, from its last line. */
function removedFolder(stdout: string): string {
  const m = /The temporary folder (\S+) was removed/.exec(stdout);
  if (!m) throw new Error(`no "temporary folder … was removed" line in:\n${stdout}`);
  return m[1];
}

test('npm start runs every step of the demo, prints its figures and removes its folder', async (t) => {
  const r = await runProgram('npm', ['start', '--silent'], { cwd: ROOT });
  t.is(r.code, 0, r.stdout + r.stderr);
  for (const [i, step] of DEMO_STEPS.entries()) {
    t.true(r.stdout.includes(`${i + 1}/${DEMO_STEPS.length} ${step.title}\n    $ ${step.command}\n`), step.name);
  }
  t.regex(r.stdout, /base: +31 MiB data, 8 MiB zeroes, 8 MiB compressed/);
  t.regex(r.stdout, /depth 1 base\.qcow2: [\d.]+ MiB data \([\d.]+ MiB compressed\), 8 MiB zero/);
  t.regex(r.stdout, /overlay\.qcow2 and backup\.qcow2: images are identical/);
  t.regex(r.stdout, /overlay2\.qcow2 and incremental\.qcow2: images are identical/);
  t.regex(r.stdout, /backup\.qcow2: no errors were found; \d+ clusters allocated, \d+ compressed; image end offset \d+/);
  t.regex(r.stdout, /incremental\.qcow2: no errors were found/);
  // Not a terminal: progress is one plain line per long step.
  t.regex(r.stdout, /\n {4}progress: 0% 10% .* 100%\n/);
  t.regex(r.stdout, /took [\d.]+ m?s: [\d.]+ MiB of data copied \([\d.]+ [KMG]iB\/s\)/);
  t.regex(r.stdout, new RegExp(`All ${DEMO_STEPS.length} steps succeeded`));
  t.false(existsSync(removedFolder(r.stdout)));
});

test('qcow2 demo --keep DIR leaves a backup that qemu-img finds clean and identical to the disk', async (t) => {
  const dir = path.join(await tempDir(t), 'kept');
  const r = await qcow2Cli('demo', '--keep', dir);
  t.is(r.code, 0, r.stdout + r.stderr);
  t.true(r.stdout.includes(`The files are in ${dir}`));
  t.deepEqual((await readdir(dir)).sort(), Object.values(DEMO_FILES).sort());
  const file = (name: string) => path.join(dir, name);
  for (const name of Object.values(DEMO_FILES)) {
    const check = await runProgram('qemu-img', ['check', file(name)]);
    t.is(check.code, 0, `${name}: ${check.stdout}${check.stderr}`);
  }
  t.is(await qemuImg('compare', file(DEMO_FILES.overlay), file(DEMO_FILES.backup)), 'Images are identical.\n');
  t.is(await qemuImg('compare', file(DEMO_FILES.top), file(DEMO_FILES.incremental)), 'Images are identical.\n');
  // The sample has what it promises: compressed clusters in the base, zero runs, and chains by relative names.
  t.regex(await qemuImg('check', file(DEMO_FILES.base)), /allocated, [\d.]+% fragmented, (?!0\.00)[\d.]+% compressed clusters/);
  const map = JSON.parse(await qemuImg('map', '--output=json', file(DEMO_FILES.overlay))) as { depth: number; zero: boolean; data: boolean; present: boolean }[];
  t.true(map.some((e) => e.depth === 1 && e.zero && !e.data && e.present));
  t.true(map.some((e) => e.depth === 0 && e.zero && !e.data && e.present));
  const chain = JSON.parse(await qemuImg('info', '--output=json', '--backing-chain', file(DEMO_FILES.incremental))) as { 'backing-filename'?: string }[];
  t.deepEqual(
    chain.map((i) => i['backing-filename']),
    [DEMO_FILES.backup, undefined],
  );
  t.regex(await qemuImg('check', file(DEMO_FILES.backup)), /100\.00% compressed clusters/);
});

test('qcow2 demo --keep refuses a folder that holds files, and touches nothing in it', async (t) => {
  const dir = await tempDir(t);
  await writeFile(path.join(dir, 'mine.txt'), 'keep me');
  const r = await qcow2Cli('demo', '--keep', dir);
  t.is(r.code, 1);
  t.regex(r.stderr, /demo: '.*' is not empty \(1 entries\); give a new or empty folder/);
  t.deepEqual(await readdir(dir), ['mine.txt']);
});

test('qcow2 demo takes no operands and has a help text', async (t) => {
  const bad = await qcow2Cli('demo', 'disk.qcow2');
  t.is(bad.code, 1);
  t.regex(bad.stderr, /demo takes no operands, got 'disk\.qcow2'/);
  const help = await qcow2Cli('demo', '--help');
  t.is(help.code, 0);
  t.regex(help.stdout, /^usage: qcow2 demo \[--keep DIR\]/);
});

test('a step that fails stops the demo, is named, and the files are still removed', async (t) => {
  const abort = new AbortController();
  const run = await runDemo({
    signal: abort.signal,
    onStepStart: (index) => {
      if (index === 4) abort.abort();
    },
  });
  t.is(run.steps.length, 3);
  t.is(run.failure?.step, 'backup');
  t.is(run.failure?.error.code, 'ABORT_ERR');
  t.false(existsSync(run.dir));
});

test('interrupted with Ctrl-C, qcow2 demo says which step failed, exits 1 and removes its folder', async (t) => {
  const child = spawn(process.execPath, [CLI, 'demo'], { stdio: ['ignore', 'pipe', 'pipe'] });
  let stdout = '';
  let stderr = '';
  child.stdout.setEncoding('utf8').on('data', (text: string) => {
    stdout += text;
    if (stdout.includes(`\n2/${DEMO_STEPS.length} `) && !child.killed) child.kill('SIGINT');
  });
  child.stderr.setEncoding('utf8').on('data', (text: string) => (stderr += text));
  const code = await new Promise<number | null>((resolve) => child.on('close', resolve));
  t.is(code, 1, stdout + stderr);
  t.regex(stderr, /^FAILED at step \d+ \(\w+: .*\)\n {4}ABORT_ERR: the (demo was interrupted|operation was aborted)\n$/);
  t.false(existsSync(removedFolder(stdout)));
});

test('--keep takes an existing empty folder', async (t) => {
  const dir = path.join(await tempDir(t), 'empty');
  await mkdir(dir);
  const run = await runDemo({ keep: dir });
  t.is(run.failure, undefined);
  t.true(run.kept);
  t.is((await readdir(dir)).length, Object.keys(DEMO_FILES).length);
});

test('progress: a bar redrawn in place on a terminal, one growing line elsewhere', (t) => {
  let text = '';
  const sink = { write: (chunk: string) => (text += chunk) };
  const bar = new ProgressDisplay(sink, true);
  for (const done of [0, 1, 2, 5, 10]) bar.update(done << 20, 10 << 20);
  bar.end();
  t.is(text.split('\r').length - 1, 5);
  t.regex(text, /\r {4}\[#{15}\.{15}\]  50%  5 MiB of 10 MiB/);
  t.true(text.endsWith('[##############################] 100%  10 MiB of 10 MiB\x1b[K\n'));
  text = '';
  const line = new ProgressDisplay(sink, false);
  for (const done of [0, 1, 2, 3, 5, 10]) line.update(done, 10);
  line.end();
  t.is(text, '    progress: 0% 10% 20% 30% 50% 100%\n');
});

test('figures are printed in binary units and readable times', (t) => {
  t.is(formatBytes(0), '0 bytes');
  t.is(formatBytes(1023), '1023 bytes');
  t.is(formatBytes(64 * 1024), '64 KiB');
  t.is(formatBytes(2162688), '2.06 MiB');
  t.is(formatBytes(47185920), '45 MiB');
  t.is(formatBytes(24301568), '23.2 MiB');
  t.is(formatBytes(2 ** 30), '1 GiB');
  t.is(formatSeconds(0.0004), '1 ms');
  t.is(formatSeconds(0.317), '317 ms');
  t.is(formatSeconds(2.371), '2.37 s');
});
