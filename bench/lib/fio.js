'use strict';
/** fio runs: the disk's own limit, to put our figures and qemu-img's in context. */
const { runChecked } = require('./proc.js');

/** The standard set: 1 MiB sequential read and write, 4 KiB and 64 KiB random read, all at depth 16. */
const STANDARD_JOBS = [
  { name: 'seq-read-1M', rw: 'read', bs: '1M', iodepth: 16 },
  { name: 'seq-write-1M', rw: 'write', bs: '1M', iodepth: 16 },
  { name: 'rand-read-4K', rw: 'randread', bs: '4k', iodepth: 16 },
  { name: 'rand-read-64K', rw: 'randread', bs: '64k', iodepth: 16 },
];

/** The fio command line of one job: O_DIRECT, libaio, time based. */
function fioArgs(job, file, { size, runtime = 10, rampTime = 2 }) {
  const args = [
    'fio',
    `--name=${job.name}`,
    `--filename=${file}`,
    `--rw=${job.rw}`,
    `--bs=${job.bs}`,
    `--iodepth=${job.iodepth}`,
    '--ioengine=libaio',
    '--direct=1',
    '--numjobs=1',
    `--runtime=${runtime}`,
    `--ramp_time=${rampTime}`,
    '--time_based',
    '--group_reporting',
    '--output-format=json',
  ];
  if (size !== undefined) args.push(`--size=${size}`);
  if (job.readonly) args.push('--readonly');
  return args;
}

/** Run one fio job; resolves { name, command, mbps, iops, latUsMean }. */
async function runFioJob(job, file, options = {}) {
  const args = fioArgs(job, file, options);
  const output = await runChecked(args);
  // fio may print warnings before the JSON document.
  const json = JSON.parse(output.slice(output.indexOf('{')));
  const j = json.jobs[0];
  const side = job.rw.includes('write') ? j.write : j.read;
  return {
    name: job.name,
    command: args.join(' '),
    mbps: side.bw_bytes / 1e6,
    iops: side.iops,
    latUsMean: side.lat_ns ? side.lat_ns.mean / 1000 : NaN,
  };
}

/**
 * Run several jobs at once (one fio process, each job its own file and pattern), e.g. reading an
 * image while writing a new file, the shape of a convert. A job is { name, filename, rw, bs,
 * iodepth, size?, ioSize? }. Resolves the command and, per job, { name, runtimeMs, mbps, iops }.
 */
async function runFioTogether(jobs) {
  const args = ['fio', '--output-format=json', '--ioengine=libaio', '--direct=1'];
  for (const job of jobs) {
    args.push(`--name=${job.name}`, `--filename=${job.filename}`, `--rw=${job.rw}`, `--bs=${job.bs}`, `--iodepth=${job.iodepth}`);
    if (job.size !== undefined) args.push(`--size=${job.size}`);
    if (job.ioSize !== undefined) args.push(`--io_size=${job.ioSize}`);
  }
  const output = await runChecked(args);
  const json = JSON.parse(output.slice(output.indexOf('{')));
  const results = json.jobs.map((j) => {
    const side = j.write.io_bytes > 0 ? j.write : j.read;
    return { name: j.jobname, runtimeMs: side.runtime, mbps: side.bw_bytes / 1e6, iops: side.iops };
  });
  return { command: args.join(' '), results };
}

module.exports = { STANDARD_JOBS, fioArgs, runFioJob, runFioTogether };
