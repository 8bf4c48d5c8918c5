/** qemu's `-o key=value,…` option syntax for image creation: parsing, typed values, help, the "Formatting" line. */
import { ErrorCodes, Qcow2Error } from '../errors.js';
import type { ImageFormat } from '../image.js';
import type { CreateOptions, Preallocation } from './create.js';

/** How a value is written and checked: as qemu's QemuOpts types. */
export type OptionType = 'size' | 'bool' | 'str' | 'num';

/** One creation option a format accepts. */
export interface OptionDef {
  name: string;
  type: OptionType;
  help: string;
  /** The value shown in the "Formatting" line when the option is not given. */
  default?: string;
  /** The option belongs to the file protocol, not the format: `-o help` without a file name leaves it out. */
  protocol?: boolean;
}

const SIZE: OptionDef = { name: 'size', type: 'size', help: 'Virtual disk size' };

/** qcow2's options, in the order qemu-img lists them on its "Formatting" line. */
const QCOW2_OPTIONS: readonly OptionDef[] = [
  { name: 'cluster_size', type: 'size', help: 'qcow2 cluster size', default: '65536' },
  { name: 'extended_l2', type: 'bool', help: 'Extended L2 tables', default: 'off' },
  {
    name: 'preallocation',
    type: 'str',
    help: 'Preallocation mode (allowed values: off, metadata, falloc, full)',
  },
  {
    name: 'compression_type',
    type: 'str',
    help: 'Compression method used for image cluster compression',
    default: 'zlib',
  },
  SIZE,
  { name: 'compat', type: 'str', help: 'Compatibility level (v2 [0.10] or v3 [1.1])' },
  { name: 'backing_file', type: 'str', help: 'File name of a base image' },
  { name: 'backing_fmt', type: 'str', help: 'Image format of the base image' },
  { name: 'data_file', type: 'str', help: 'File name of an external data file' },
  { name: 'data_file_raw', type: 'bool', help: 'The external data file must stay valid as a raw image' },
  { name: 'lazy_refcounts', type: 'bool', help: 'Postpone refcount updates', default: 'off' },
  { name: 'refcount_bits', type: 'num', help: 'Width of a reference count entry in bits', default: '16' },
];

/** raw's options (its own, then the file protocol's preallocation), in "Formatting" order. */
const RAW_OPTIONS: readonly OptionDef[] = [
  SIZE,
  { name: 'preallocation', type: 'str', help: 'Preallocation mode (allowed values: off, falloc, full)', protocol: true },
];

/** The options `format` accepts when creating an image. */
export function createOptionsOf(format: ImageFormat): readonly OptionDef[] {
  return format === 'qcow2' ? QCOW2_OPTIONS : RAW_OPTIONS;
}

/** Options as given: the raw text of each, in the order they were set (a later value replaces an earlier one). */
export type OptionValues = Map<string, string>;

/** True when `text` asks for the option list instead of options (`-o help`, `-o ?`, or either among others). */
export function isHelpRequest(text: string): boolean {
  return splitOptionString(text).some((item) => item === 'help' || item === '?');
}

/** Split "a=1,b=x,,y" at single commas; a doubled comma stands for a comma in a value. */
export function splitOptionString(text: string): string[] {
  const items: string[] = [];
  let current = '';
  for (let i = 0; i < text.length; i++) {
    if (text[i] !== ',') {
      current += text[i];
    } else if (text[i + 1] === ',') {
      current += ',';
      i++;
    } else {
      items.push(current);
      current = '';
    }
  }
  items.push(current);
  return items.filter((item) => item !== '');
}

/** Parse the `-o` strings of `format` into `values` (later ones win), checking names and value syntax as qemu does. */
export function parseCreateOptions(format: ImageFormat, texts: readonly string[], values: OptionValues = new Map()): OptionValues {
  const defs = createOptionsOf(format);
  for (const text of texts) {
    for (const item of splitOptionString(text)) {
      const eq = item.indexOf('=');
      const name = eq < 0 ? item : item.slice(0, eq);
      const value = eq < 0 ? 'on' : item.slice(eq + 1);
      const def = defs.find((d) => d.name === name);
      if (!def) throw new Qcow2Error(ErrorCodes.INVALID_ARGUMENT, `Invalid parameter '${name}'`);
      checkValueSyntax(def, value);
      values.delete(name);
      values.set(name, value);
    }
  }
  return values;
}

/** Reject a value its option's type cannot hold, with qemu's wording. */
function checkValueSyntax(def: OptionDef, value: string): void {
  if (def.type === 'size') parseOptionSize(def.name, value);
  else if (def.type === 'bool') parseOptionBool(def.name, value);
  else if (def.type === 'num') parseOptionNumber(def.name, value);
}

const SIZE_SUFFIXES = 'bkmgtpe';

/** qemu's size syntax (a decimal number, maybe with a fraction, or a hex one; a k/M/G/T/P/E suffix) as bytes. */
export function parseOptionSize(name: string, text: string): number {
  const m = /^(0x[0-9a-f]+|\d+(?:\.\d+)?)([bkmgtpe]?)$/i.exec(text.trim());
  const power = m ? Math.max(0, SIZE_SUFFIXES.indexOf(m[2].toLowerCase() || 'b')) : 0;
  const value = m ? Number(m[1]) * 1024 ** power : NaN;
  if (!m || !(value < 2 ** 64) || (m[1].includes('.') && power === 0)) {
    throw new Qcow2Error(
      ErrorCodes.INVALID_ARGUMENT,
      `Parameter '${name}' expects a non-negative number below 2^64\n` +
        'Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\nand exabytes, respectively.',
    );
  }
  const bytes = Math.floor(value);
  if (!Number.isSafeInteger(bytes)) {
    throw new Qcow2Error(ErrorCodes.INVALID_ARGUMENT, `Parameter '${name}' is ${text}: above 2^53 bytes, which this package does not handle`);
  }
  return bytes;
}

/** qemu's boolean syntax: on/yes/true/y or off/no/false/n. */
export function parseOptionBool(name: string, text: string): boolean {
  if (['on', 'yes', 'true', 'y'].includes(text)) return true;
  if (['off', 'no', 'false', 'n'].includes(text)) return false;
  throw new Qcow2Error(ErrorCodes.INVALID_ARGUMENT, `Parameter '${name}' expects 'on' or 'off'`);
}

/** A plain non-negative integer (decimal, or 0x hexadecimal, as strtoull). */
export function parseOptionNumber(name: string, text: string): number {
  const value = /^(0x[0-9a-f]+|\d+)$/i.test(text.trim()) ? Number(text.trim()) : NaN;
  if (!Number.isSafeInteger(value)) throw new Qcow2Error(ErrorCodes.INVALID_ARGUMENT, `Parameter '${name}' expects a number`);
  return value;
}

/**
 * qemu-img's "Formatting 'PATH', fmt=FMT k=v …" line: every option given or with a default,
 * in the format's order; sizes are shown in bytes, other values as given.
 */
export function formattingLine(path: string, format: ImageFormat, values: OptionValues): string {
  const parts = [`Formatting '${path}', fmt=${format}`];
  for (const def of createOptionsOf(format)) {
    const value = values.get(def.name) ?? def.default;
    if (value === undefined) continue;
    parts.push(`${def.name}=${def.type === 'size' && values.has(def.name) ? parseOptionSize(def.name, value) : value}`);
  }
  return parts.join(' ');
}

/**
 * The `-o help` listing: options sorted by name, described as qemu-img does; with a file name
 * the protocol's options are included, without one a note says they exist.
 */
export function optionHelp(format: ImageFormat, withFileName: boolean): string {
  const lines = [withFileName ? 'Supported options:' : `Supported ${format} options:`];
  const defs = createOptionsOf(format).filter((def) => withFileName || !def.protocol);
  const sorted = [...defs].sort((a, b) => (a.name < b.name ? -1 : 1));
  for (const def of sorted) {
    const type = def.type === 'bool' ? 'bool (on/off)' : def.type;
    lines.push(`  ${`${def.name}=<${type}>`.padEnd(22)} - ${def.help}`);
  }
  if (!withFileName) {
    lines.push('', 'The protocol level may support further options.', 'Specify the target filename to include those options.');
  }
  return lines.join('\n') + '\n';
}

/** The typed create options of `format` from option values (already checked for syntax). */
export function createOptionsFrom(format: ImageFormat, values: OptionValues): CreateOptions {
  const text = (name: string) => values.get(name);
  const map = <T>(name: string, parse: (name: string, value: string) => T): T | undefined => {
    const value = text(name);
    return value === undefined ? undefined : parse(name, value);
  };
  return {
    format,
    size: map('size', parseOptionSize),
    preallocation: text('preallocation') as Preallocation | undefined,
    compat: text('compat') as CreateOptions['compat'],
    clusterSize: map('cluster_size', parseOptionSize),
    refcountBits: map('refcount_bits', parseOptionNumber),
    backingFile: text('backing_file'),
    backingFormat: text('backing_fmt') as ImageFormat | undefined,
    dataFile: text('data_file'),
    dataFileRaw: map('data_file_raw', parseOptionBool),
    extendedL2: map('extended_l2', parseOptionBool),
    lazyRefcounts: map('lazy_refcounts', parseOptionBool),
    compressionType: text('compression_type') as CreateOptions['compressionType'],
  };
}
