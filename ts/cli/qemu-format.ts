/** Output in qemu-img's formats: sizes ("196 KiB"), pretty JSON, snapshot tables, nested key dumps. */
import { ErrorCodes, Qcow2Error } from '../errors.js';
import { encodeName } from '../qcow2/text.js';

const SIZE_SUFFIXES = ['', 'Ki', 'Mi', 'Gi', 'Ti', 'Pi', 'Ei'];

/**
 * A byte count the way qemu-img writes it: three significant digits in the largest binary unit
 * whose value stays below 1000 ("0.977 KiB", "196 KiB", "1 GiB"), rounded half to even on the
 * exact value, as printf's %.3g does.
 */
export function sizeToStr(bytes: number | bigint): string {
  const value = BigInt(bytes);
  if (value < 0n) throw new Qcow2Error(ErrorCodes.INVALID_ARGUMENT, `sizeToStr: size ${value} is negative`);
  let unit = 0;
  while (unit < SIZE_SUFFIXES.length - 1 && value >= 1000n * 1024n ** BigInt(unit)) unit++;
  return `${formatG3(value, 1024n ** BigInt(unit))} ${SIZE_SUFFIXES[unit]}B`;
}

/** printf("%.3g", num / den) for num >= 0, den > 0, computed exactly. */
function formatG3(num: bigint, den: bigint): string {
  if (num === 0n) return '0';
  // exponent: floor(log10(num / den))
  let exp = (num / den).toString().length - 1;
  if (num < den) {
    exp = -1;
    while (num * 10n ** BigInt(-exp) < den) exp--;
  }
  let digits = roundHalfEven(num, den, 2 - exp);
  if (digits === 1000n) {
    digits = 100n;
    exp++;
  }
  const d = digits.toString();
  if (exp < -4 || exp >= 3) {
    const mantissa = stripZeros(`${d[0]}.${d.slice(1)}`);
    return `${mantissa}e${exp < 0 ? '-' : '+'}${String(Math.abs(exp)).padStart(2, '0')}`;
  }
  if (exp < 0) return stripZeros(`0.${'0'.repeat(-exp - 1)}${d}`);
  return stripZeros(`${d.slice(0, exp + 1)}.${d.slice(exp + 1)}`);
}

/** round(num / den * 10^shift), ties to even. */
function roundHalfEven(num: bigint, den: bigint, shift: number): bigint {
  const n = shift >= 0 ? num * 10n ** BigInt(shift) : num;
  const d = shift >= 0 ? den : den * 10n ** BigInt(-shift);
  const q = n / d;
  const twice = (n % d) * 2n;
  if (twice > d || (twice === d && q % 2n === 1n)) return q + 1n;
  return q;
}

function stripZeros(text: string): string {
  return text.includes('.') ? text.replace(/0+$/, '').replace(/\.$/, '') : text;
}

const REPLACEMENT = 0xfffd;
const MIN_FOR_LENGTH = [0, 0, 0x80, 0x800, 0x10000];

/**
 * Code points of `bytes` the way qemu's JSON writer decodes them: a lead byte and the
 * continuation bytes after it form one sequence, and any bad sequence (cut short, overlong,
 * a surrogate, above U+10FFFF) is one U+FFFD, except the overlong NUL C0 80, which is U+0000.
 */
function qemuCodePoints(bytes: Uint8Array): number[] {
  const out: number[] = [];
  let at = 0;
  while (at < bytes.length) {
    const lead = bytes[at];
    if (lead < 0xc0 || lead >= 0xf8) {
      out.push(lead < 0x80 ? lead : REPLACEMENT);
      at++;
      continue;
    }
    const need = lead >= 0xf0 ? 4 : lead >= 0xe0 ? 3 : 2;
    let code = lead & (0x7f >> need);
    let n = 1;
    for (; n < need && at + n < bytes.length && (bytes[at + n] & 0xc0) === 0x80; n++) code = (code << 6) | (bytes[at + n] & 0x3f);
    at += n;
    if (n < need) out.push(REPLACEMENT);
    else if (code < MIN_FOR_LENGTH[need]) out.push(need === 2 && code === 0 ? 0 : REPLACEMENT);
    else if ((code >= 0xd800 && code <= 0xdfff) || code > 0x10ffff) out.push(REPLACEMENT);
    else out.push(code);
  }
  return out;
}

const SHORT_ESCAPES: Record<number, string> = { 0x22: '\\"', 0x5c: '\\\\', 0x08: '\\b', 0x0c: '\\f', 0x0a: '\\n', 0x0d: '\\r', 0x09: '\\t' };

function unicodeEscape(unit: number): string {
  return '\\u' + unit.toString(16).toUpperCase().padStart(4, '0');
}

/** A JSON string the way qemu writes it: only printable ASCII stays, all else is escaped (names' raw bytes as qemu decodes them). */
export function qemuJsonString(text: string): string {
  let out = '"';
  for (const code of qemuCodePoints(encodeName(text))) {
    if (SHORT_ESCAPES[code]) out += SHORT_ESCAPES[code];
    else if (code >= 0x20 && code < 0x7f) out += String.fromCharCode(code);
    else if (code > 0xffff) out += unicodeEscape(0xd800 + ((code - 0x10000) >> 10)) + unicodeEscape(0xdc00 + ((code - 0x10000) & 0x3ff));
    else out += unicodeEscape(code);
  }
  return out + '"';
}

/** JSON values this printer handles: what qemu-img's outputs contain. */
export type QemuJsonValue = string | number | bigint | boolean | null | QemuJsonValue[] | { [key: string]: QemuJsonValue | undefined };

/** qemu's pretty JSON: 4-space indents, "key": value, empty containers opened and closed on two lines. */
export function qemuJson(value: QemuJsonValue, indent = 0): string {
  const pad = (n: number) => ' '.repeat(4 * n);
  if (typeof value === 'string') return qemuJsonString(value);
  if (typeof value === 'number' || typeof value === 'bigint' || typeof value === 'boolean') return String(value);
  if (value === null) return 'null';
  if (Array.isArray(value)) {
    const items = value.map((v) => pad(indent + 1) + qemuJson(v, indent + 1));
    return `[\n${items.join(',\n')}${items.length ? '\n' : ''}${pad(indent)}]`;
  }
  const items = Object.entries(value)
    .filter(([, v]) => v !== undefined)
    .map(([k, v]) => `${pad(indent + 1)}${qemuJsonString(k)}: ${qemuJson(v as QemuJsonValue, indent + 1)}`);
  return `{\n${items.join(',\n')}${items.length ? '\n' : ''}${pad(indent)}}`;
}

/**
 * qemu-img's human dump of nested data ("Format specific information:"): "key: value" with '-'
 * in keys shown as spaces, lists as "[i]:" items, each level 4 spaces deeper.
 */
export function dumpNested(value: { [key: string]: QemuJsonValue | undefined }, indent: number): string[] {
  const lines: string[] = [];
  for (const [key, v] of Object.entries(value)) {
    if (v !== undefined) dumpItem(lines, key.replace(/-/g, ' '), v, indent);
  }
  return lines;
}

function dumpItem(lines: string[], label: string, value: QemuJsonValue, indent: number): void {
  const pad = ' '.repeat(indent);
  if (Array.isArray(value)) {
    lines.push(`${pad}${label}:`);
    value.forEach((v, i) => dumpItem(lines, `[${i}]`, v, indent + 4));
  } else if (value !== null && typeof value === 'object') {
    lines.push(`${pad}${label}:`);
    lines.push(...dumpNested(value, indent + 4));
  } else {
    lines.push(`${pad}${label}: ${String(value)}`);
  }
}

/** A snapshot as the human table needs it. */
export interface SnapshotRow {
  id: string;
  name: string;
  vmStateSize: number;
  dateSec: number;
  vmClockNsec: bigint;
  icount?: number | bigint;
}

/** Pad `text` to `width` bytes (printf counts bytes, not characters). */
function padBytes(text: string, width: number, left: boolean): string {
  const fill = ' '.repeat(Math.max(0, width - encodeName(text).length));
  return left ? text + fill : fill + text;
}

function two(n: number): string {
  return String(n).padStart(2, '0');
}

/** The columns after the tag: VM SIZE, DATE, VM CLOCK, ICOUNT (right-aligned). */
function tail(size: string, date: string, clock: string, icount: string): string {
  return `${padBytes(size, 8, false)}${padBytes(date, 20, false)}${padBytes(clock, 13, false)}${padBytes(icount, 11, false)}`;
}

/** One table row; the tag column is one narrower than the heading's, with a separating space. */
function snapshotLine(id: string, tag: string, size: string, date: string, clock: string, icount: string): string {
  return `${padBytes(id, 9, true)} ${padBytes(tag, 16, true)} ${tail(size, date, clock, icount)}`;
}

/** qemu-img's snapshot table: a header line and one line per snapshot (dates in local time). */
export function snapshotTable(rows: readonly SnapshotRow[]): string[] {
  const lines = [`${padBytes('ID', 10, true)}${padBytes('TAG', 17, true)}${tail('VM SIZE', 'DATE', 'VM CLOCK', 'ICOUNT')}`];
  for (const s of rows) {
    const d = new Date(s.dateSec * 1000);
    const date = `${d.getFullYear()}-${two(d.getMonth() + 1)}-${two(d.getDate())} ${two(d.getHours())}:${two(d.getMinutes())}:${two(d.getSeconds())}`;
    const secs = s.vmClockNsec / 1_000_000_000n;
    const ms = (s.vmClockNsec / 1_000_000n) % 1000n;
    const clock = `${two(Number(secs / 3600n))}:${two(Number((secs / 60n) % 60n))}:${two(Number(secs % 60n))}.${String(ms).padStart(3, '0')}`;
    lines.push(snapshotLine(s.id, s.name, sizeToStr(s.vmStateSize), date, clock, s.icount === undefined ? '' : String(s.icount)));
  }
  return lines;
}
