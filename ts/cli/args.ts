/** A getopt_long-style parser: the argument syntax qemu-img and qemu-io accept. */
import { ErrorCodes, Qcow2Error } from '../errors.js';

/**
 * A spec in getopt's own notation: `short` is an optstring ("f:O:hp" — a colon marks an
 * option that takes a value), `long` maps long names to whether they take a value and to the
 * key they are stored under (a short letter, or the long name itself).
 */
export interface ArgSpec {
  short: string;
  long?: Record<string, { value: boolean; key?: string }>;
}

export interface ParsedArgs {
  /** Each option's values in order; a flag stores '' once per occurrence. */
  options: Map<string, string[]>;
  positional: string[];
}

/** Thrown for a command line the command does not accept; the CLI prints it and exits 1. */
export class UsageError extends Qcow2Error {
  constructor(message: string) {
    super(ErrorCodes.INVALID_ARGUMENT, message);
  }
}

/** The hint qemu-img adds to every usage error. */
export const HELP_HINT = "\nTry 'qcow2 --help' for more information";

/** getopt's complaint reworded as qemu-img words it (qemu-img names the whole argument). */
export function qemuUsage(error: UsageError, argv: readonly string[]): UsageError {
  const missing = /^option requires an argument -- '(.)'$|^option '(--[^']+)' requires an argument$/.exec(error.message);
  if (missing) return new UsageError(`missing argument for option '${missing[1] ? `-${missing[1]}` : missing[2]}'${HELP_HINT}`);
  const invalid = /^invalid option -- '(.)'$/.exec(error.message);
  if (invalid) {
    const arg = argv.find((a) => /^-[^-]/.test(a) && a.includes(invalid[1])) ?? `-${invalid[1]}`;
    return new UsageError(`unrecognized option '${arg}'${HELP_HINT}`);
  }
  return new UsageError(error.message + HELP_HINT);
}

/** Parse `argv` with GNU getopt's rules: options may follow operands, `--` ends options. */
export function parseArgs(argv: readonly string[], spec: ArgSpec): ParsedArgs {
  const options = new Map<string, string[]>();
  const positional: string[] = [];
  const add = (key: string, value: string) => {
    const list = options.get(key);
    if (list) list.push(value);
    else options.set(key, [value]);
  };
  const takesValue = (letter: string): boolean | undefined => {
    const i = spec.short.indexOf(letter);
    if (i < 0 || letter === ':') return undefined;
    return spec.short[i + 1] === ':';
  };
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    if (arg === '--') {
      positional.push(...argv.slice(i + 1));
      break;
    }
    if (arg.startsWith('--')) {
      const eq = arg.indexOf('=');
      const name = arg.slice(2, eq < 0 ? undefined : eq);
      const matches = Object.keys(spec.long ?? {}).filter((n) => n === name || n.startsWith(name));
      const exact = matches.includes(name) ? name : matches.length === 1 ? matches[0] : undefined;
      if (!exact) {
        throw new UsageError(matches.length > 1 ? `option '--${name}' is ambiguous` : `unrecognized option '--${name}'`);
      }
      const def = spec.long![exact];
      const key = def.key ?? exact;
      if (def.value) {
        if (eq >= 0) add(key, arg.slice(eq + 1));
        else if (i + 1 < argv.length) add(key, argv[++i]);
        else throw new UsageError(`option '--${exact}' requires an argument`);
      } else {
        if (eq >= 0) throw new UsageError(`option '--${exact}' doesn't allow an argument`);
        add(key, '');
      }
      continue;
    }
    if (arg.startsWith('-') && arg.length > 1) {
      for (let j = 1; j < arg.length; j++) {
        const letter = arg[j];
        const value = takesValue(letter);
        if (value === undefined) throw new UsageError(`invalid option -- '${letter}'`);
        if (!value) {
          add(letter, '');
          continue;
        }
        if (j + 1 < arg.length) add(letter, arg.slice(j + 1));
        else if (i + 1 < argv.length) add(letter, argv[++i]);
        else throw new UsageError(`option requires an argument -- '${letter}'`);
        break;
      }
      continue;
    }
    positional.push(arg);
  }
  return { options, positional };
}

/** The last value given for `key`, or undefined. */
export function lastOption(args: ParsedArgs, key: string): string | undefined {
  const list = args.options.get(key);
  return list ? list[list.length - 1] : undefined;
}

/** qemu-img's size syntax: a number with an optional suffix k/K, M, G, T, P, E (powers of 1024), or b/B. */
export function parseSize(text: string): number {
  const m = /^\s*(\d+(?:\.\d+)?)\s*([bBkKmMgGtTpPeE]?)\s*$/.exec(text);
  if (!m) throw new UsageError(`Invalid size specified: '${text}'`);
  const exponent = ' bkmgtpe'.indexOf(m[2].toLowerCase() || ' ');
  const scale = exponent <= 1 ? 1 : 1024 ** (exponent - 1);
  const value = Number(m[1]) * scale;
  if (!Number.isSafeInteger(Math.floor(value)) || (m[1].includes('.') && exponent <= 1)) {
    throw new UsageError(`Invalid size specified: '${text}'`);
  }
  return Math.floor(value);
}
