/**
 * The README's library examples run as written: every ```js runnable block is saved as an ES
 * module in a fresh folder beside the images described in the README, run with node (the
 * package resolves as 'qcow2'), and must exit 0 and print what the README says it prints.
 */
import { mkdir, readFile, symlink, writeFile } from 'node:fs/promises';
import path from 'node:path';

import test from 'ava';

import { qemuImg, qemuIo, runProgram, tempDir } from './helpers/qemu.js';

const ROOT = path.join(__dirname, '..', '..');

/** One runnable example: its section title, its code, and the output the README shows for it. */
interface Example {
  title: string;
  code: string;
  prints?: string;
}

/** The runnable blocks of `markdown`, each with the ```text block after a "Prints:" line that follows it. */
function runnableExamples(markdown: string): Example[] {
  const examples: Example[] = [];
  const block = /^```js runnable\n([\s\S]*?)^```\n(?:\nPrints:\n\n```text\n([\s\S]*?)^```\n)?/gm;
  for (const m of markdown.matchAll(block)) {
    const before = markdown.slice(0, m.index);
    const heading = [...before.matchAll(/^#+ (.*)$/gm)].pop();
    examples.push({ title: heading ? heading[1] : `block at ${m.index}`, code: m[1], prints: m[2] });
  }
  return examples;
}

/** The images the README's examples expect: disk.qcow2, an overlay on base.qcow2 (as the README describes them). */
async function makeImages(dir: string): Promise<void> {
  const base = path.join(dir, 'base.qcow2');
  const disk = path.join(dir, 'disk.qcow2');
  await qemuImg('create', '-q', '-f', 'qcow2', base, '64M');
  await qemuIo('-f', 'qcow2', '-c', 'write -P 0x11 0 4M', '-c', 'write -z 8M 1M', '-c', 'write -c -P 0x33 16M 64k', base);
  await qemuImg('create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', disk);
  await qemuIo('-f', 'qcow2', '-c', 'write -P 0x22 1M 1M', disk);
}

/** A folder where `import 'qcow2'` finds this package, as it would in a project that installed it. */
async function exampleDir(parent: string, index: number): Promise<string> {
  const dir = path.join(parent, `example-${index}`);
  await mkdir(path.join(dir, 'node_modules'), { recursive: true });
  await symlink(ROOT, path.join(dir, 'node_modules', 'qcow2'), 'dir');
  await makeImages(dir);
  return dir;
}

const README = path.join(ROOT, 'README.md');

test('the README has a runnable example for each use of the library', async (t) => {
  const titles = runnableExamples(await readFile(README, 'utf8')).map((e) => e.title);
  for (const use of ['Open and read', 'Extents', 'Read stream', 'Create', 'Convert', 'Check', 'Info', 'Errors']) {
    t.true(
      titles.some((title) => title.startsWith(use)),
      `no runnable example under a heading starting with "${use}" (found: ${titles.join(', ')})`,
    );
  }
});

test('every runnable README example runs and prints what the README shows', async (t) => {
  const examples = runnableExamples(await readFile(README, 'utf8'));
  const parent = await tempDir(t);
  for (const [i, example] of examples.entries()) {
    const dir = await exampleDir(parent, i);
    await writeFile(path.join(dir, 'example.mjs'), example.code);
    const r = await runProgram(process.execPath, ['example.mjs'], { cwd: dir });
    t.is(r.code, 0, `"${example.title}" failed:\n${r.stdout}${r.stderr}`);
    if (example.prints !== undefined) t.is(r.stdout, example.prints, `"${example.title}" printed something else`);
  }
  t.true(examples.length > 0);
});
