/**
 * Names stored in an image (backing file, formats, snapshot and bitmap names) are bytes, usually
 * UTF-8. They become strings without losing a byte: valid UTF-8 decodes normally, and each byte
 * that is not part of valid UTF-8 becomes a lone surrogate U+DC80..U+DCFF (Python's
 * "surrogateescape"), which encodeName turns back into that byte.
 */

const ESCAPE_BASE = 0xdc00;

/** Length of the valid UTF-8 sequence at `at`, or 0 when the byte there starts none. */
function validSequenceLength(bytes: Uint8Array, at: number): number {
  const b = bytes[at];
  if (b < 0x80) return 1;
  const cont = (i: number) => at + i < bytes.length && (bytes[at + i] & 0xc0) === 0x80;
  if (b >= 0xc2 && b <= 0xdf) return cont(1) ? 2 : 0;
  if (b >= 0xe0 && b <= 0xef) {
    if (!cont(1) || !cont(2)) return 0;
    const second = bytes[at + 1];
    if (b === 0xe0 && second < 0xa0) return 0; // overlong
    if (b === 0xed && second >= 0xa0) return 0; // UTF-16 surrogate
    return 3;
  }
  if (b >= 0xf0 && b <= 0xf4) {
    if (!cont(1) || !cont(2) || !cont(3)) return 0;
    const second = bytes[at + 1];
    if (b === 0xf0 && second < 0x90) return 0; // overlong
    if (b === 0xf4 && second >= 0x90) return 0; // above U+10FFFF
    return 4;
  }
  return 0;
}

/** Decode stored name bytes; bytes outside valid UTF-8 become U+DC80..U+DCFF. */
export function decodeName(bytes: Uint8Array): string {
  let out = '';
  let at = 0;
  while (at < bytes.length) {
    const length = validSequenceLength(bytes, at);
    if (length === 0) {
      out += String.fromCharCode(ESCAPE_BASE + bytes[at]);
      at += 1;
    } else {
      out += Buffer.from(bytes.buffer, bytes.byteOffset + at, length).toString('utf8');
      at += length;
    }
  }
  return out;
}

/** The bytes a decoded name came from (escaped bytes restored); plain strings encode as UTF-8. */
export function encodeName(text: string): Buffer {
  const parts: Buffer[] = [];
  let run = '';
  for (let i = 0; i < text.length; i++) {
    const code = text.charCodeAt(i);
    const lone = code >= 0xdc80 && code <= 0xdcff && !(i > 0 && isHighSurrogate(text.charCodeAt(i - 1)));
    if (lone) {
      parts.push(Buffer.from(run, 'utf8'), Buffer.from([code - ESCAPE_BASE]));
      run = '';
    } else {
      run += text[i];
    }
  }
  parts.push(Buffer.from(run, 'utf8'));
  return Buffer.concat(parts);
}

function isHighSurrogate(code: number): boolean {
  return code >= 0xd800 && code <= 0xdbff;
}

/** qemu reads names as C strings: a name stops at its first NUL byte. */
export function cString(text: string): string {
  const nul = text.indexOf('\0');
  return nul < 0 ? text : text.slice(0, nul);
}

/** A name with a ':' before any '/' names a protocol ("file:x", "nbd://host/x"), as in qemu. */
export function hasProtocol(name: string): boolean {
  return /^[^/]*:/.test(name);
}

/**
 * Where a file name an image records (backing or data file) points, combined the way qemu
 * does: the directory part of the image's name, as given, plus the name; absolute and
 * protocol names stay as they are.
 */
export function combineFileName(imagePath: string, name: string): string {
  if (name.startsWith('/') || hasProtocol(name)) return name;
  const slash = imagePath.lastIndexOf('/');
  return slash < 0 ? name : imagePath.slice(0, slash + 1) + name;
}
