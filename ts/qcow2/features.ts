/** qcow2 feature bits (incompatible, compatible, autoclear) and the check for unknown ones. */
import { ErrorCodes, Qcow2Error } from '../errors.js';

/** Incompatible feature bits (header bytes 72-79). */
export const IncompatibleBit = {
  DIRTY: 0,
  CORRUPT: 1,
  EXTERNAL_DATA_FILE: 2,
  COMPRESSION_TYPE: 3,
  EXTENDED_L2: 4,
} as const;

/** Compatible feature bits (header bytes 80-87). */
export const CompatibleBit = { LAZY_REFCOUNTS: 0 } as const;

/** Autoclear feature bits (header bytes 88-95). */
export const AutoclearBit = { BITMAPS: 0, DATA_FILE_RAW: 1 } as const;

/** The incompatible bits this package implements; any other set bit makes the image unreadable. */
export const KNOWN_INCOMPATIBLE = 0b11111n;
/** The compatible bits this package knows. */
export const KNOWN_COMPATIBLE = 0b1n;
/** The autoclear bits this package keeps consistent; others are cleared on a writable open. */
export const KNOWN_AUTOCLEAR = 0b11n;

/** An entry of the feature name table extension: the name of one feature bit. */
export interface FeatureName {
  type: 'incompatible' | 'compatible' | 'autoclear';
  bit: number;
  name: string;
}

/** Whether bit `bit` is set in `mask`. */
export function hasBit(mask: bigint, bit: number): boolean {
  return ((mask >> BigInt(bit)) & 1n) === 1n;
}

/** `mask` with bit `bit` set to `on`. */
export function withBit(mask: bigint, bit: number, on: boolean): bigint {
  const b = 1n << BigInt(bit);
  return on ? mask | b : mask & ~b;
}

/**
 * Refuse unknown incompatible bits, in qemu-img's words: the names the image's feature-name
 * table gives them (in table order), then "Unknown incompatible feature: <hex mask>" for the rest.
 */
export function checkIncompatibleFeatures(incompatible: bigint, featureNames: readonly FeatureName[]): void {
  let unknown = incompatible & ~KNOWN_INCOMPATIBLE;
  if (unknown === 0n) return;
  const parts: string[] = [];
  for (const feature of featureNames) {
    if (feature.type === 'incompatible' && hasBit(unknown, feature.bit)) {
      parts.push(feature.name);
      unknown = withBit(unknown, feature.bit, false);
    }
  }
  if (unknown !== 0n) parts.push(`Unknown incompatible feature: ${unknown.toString(16)}`);
  throw new Qcow2Error(ErrorCodes.UNKNOWN_FEATURE, `Unsupported qcow2 feature(s): ${parts.join(', ')}`);
}

/** The autoclear mask a writable open must store: bits this package does not maintain are cleared (spec: "Bitmask of auto-clear features"). */
export function clearUnknownAutoclear(autoclear: bigint): bigint {
  return autoclear & KNOWN_AUTOCLEAR;
}
