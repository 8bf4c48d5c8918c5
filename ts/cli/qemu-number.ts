/** qemu-img's number arguments (cvtnum): sizes with k/M/G/T/P/E suffixes, range-checked, in qemu's wording. */
import { UsageError } from './args.js';

/** INT64_MAX: qemu-img's usual upper bound. */
export const INT64_MAX = (1n << 63n) - 1n;
const UINT64_MAX = (1n << 64n) - 1n;
const SUFFIXES = 'bkmgtpe';

/** What qemu's size parser makes of a text: a value, a syntax error, or a value beyond 64 bits. */
type Parsed = { value: bigint; hexSuffix: boolean } | 'invalid' | 'range';

/**
 * qemu_strtosz: optional leading blanks and '+', a decimal number (a fraction needs a suffix
 * unless it is zero) or a 0x hexadecimal one, then at most one suffix letter (b or a power of 1024).
 */
function parseQemuSize(text: string): Parsed {
  const m = /^[ \t\n\v\f\r]*\+?(?:0[xX]([0-9a-fA-F]+)|(\d+)(\.\d*)?)([bBkKmMgGtTpPeE]?)$/.exec(text);
  if (!m) return 'invalid';
  const [, hex, decimal, fractionText, suffix] = m;
  const multiplier = 1n << BigInt(10 * SUFFIXES.indexOf(suffix.toLowerCase() || 'b'));
  const whole = hex !== undefined ? BigInt(`0x${hex}`) : BigInt(decimal);
  const fraction = fractionText ? Number(`0${fractionText}`) : 0;
  if (fraction !== 0 && multiplier === 1n) return 'invalid';
  if (whole > UINT64_MAX) return 'range';
  // qemu scales the fraction as a double and truncates it, so the digits agree with its own.
  const value = whole * multiplier + BigInt(Math.floor(fraction * Number(multiplier)));
  if (value > UINT64_MAX) return 'range';
  return { value, hexSuffix: hex !== undefined && suffix !== '' };
}

/**
 * qemu-img's cvtnum_full: the number `text` given for `name`, between `min` and `max`. Errors
 * carry qemu's messages (the second line of a syntax error has its own "qcow2: " prefix, as
 * qemu-img prints two error lines); `warn` gets the deprecation note for a suffixed hex number.
 */
export function cvtnum(name: string, text: string, min = 0n, max = INT64_MAX, warn?: (message: string) => void): bigint {
  const parsed = parseQemuSize(text);
  if (parsed === 'invalid') {
    throw new UsageError(
      `Invalid ${name} specified. You may use k, M, G, T, P or E suffixes for\n` +
        'qcow2: kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.',
    );
  }
  if (parsed !== 'range' && parsed.hexSuffix) warn?.(`warning: Using a multiplier suffix on hex numbers is deprecated: ${text}`);
  if (parsed === 'range' || parsed.value < min || parsed.value > max) {
    throw new UsageError(`Invalid ${name} specified. Must be between ${min} and ${max}.`);
  }
  return parsed.value;
}
