/** qemu-img's create arguments (-o …, -b/-F) for the options our createQcow2 takes. */
import type { Qcow2CreateOptions } from '../../ts/qcow2/create.js';

/** The qemu-img create arguments that ask for the same image as `o`. */
export function qemuCreateArgs(o: Partial<Qcow2CreateOptions>): string[] {
  const opts: string[] = [];
  if (o.compat) opts.push(`compat=${o.compat}`);
  if (o.clusterSize) opts.push(`cluster_size=${o.clusterSize}`);
  if (o.refcountBits) opts.push(`refcount_bits=${o.refcountBits}`);
  if (o.extendedL2) opts.push('extended_l2=on');
  if (o.lazyRefcounts) opts.push('lazy_refcounts=on');
  if (o.compressionType) opts.push(`compression_type=${o.compressionType}`);
  if (o.preallocation) opts.push(`preallocation=${o.preallocation}`);
  if (o.dataFile) opts.push(`data_file=${o.dataFile}`);
  if (o.dataFileRaw) opts.push('data_file_raw=on');
  const args = opts.length > 0 ? ['-o', opts.join(',')] : [];
  if (o.backingFile) args.push('-b', o.backingFile, '-F', o.backingFormat ?? 'qcow2');
  return args;
}
