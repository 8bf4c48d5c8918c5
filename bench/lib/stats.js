'use strict';
/** Small statistics and formatting helpers shared by every benchmark script. */

/** Median of a list of numbers (NaN for an empty list). */
function median(values) {
  const v = values.filter((x) => Number.isFinite(x)).sort((a, b) => a - b);
  if (v.length === 0) return NaN;
  const mid = v.length >> 1;
  return v.length % 2 ? v[mid] : (v[mid - 1] + v[mid]) / 2;
}

/** Largest finite value (NaN when there is none). */
function maximum(values) {
  const v = values.filter((x) => Number.isFinite(x));
  return v.length ? Math.max(...v) : NaN;
}

/** Milliseconds as "1.234 s" or "12.3 ms". */
function formatMs(ms) {
  if (!Number.isFinite(ms)) return '-';
  return ms >= 1000 ? `${(ms / 1000).toFixed(3)} s` : `${ms.toFixed(ms >= 10 ? 1 : 3)} ms`;
}

/** KiB as MiB with one decimal. */
function formatKiB(kib) {
  return Number.isFinite(kib) ? `${(kib / 1024).toFixed(1)} MiB` : '-';
}

/** Bytes as "4 GiB", "256 MiB" or "1.5 GiB". */
function formatBytes(n) {
  if (!Number.isFinite(n)) return '-';
  const [unit, div] = n >= 2 ** 30 ? ['GiB', 2 ** 30] : n >= 2 ** 20 ? ['MiB', 2 ** 20] : ['KiB', 1024];
  const v = n / div;
  return `${Number.isInteger(v) ? v : v.toFixed(2)} ${unit}`;
}

/** A count with thousands separators. */
function formatCount(n, digits = 0) {
  return Number.isFinite(n) ? n.toLocaleString('en-US', { maximumFractionDigits: digits, minimumFractionDigits: digits }) : '-';
}

/** A ratio with two decimals. */
function formatRatio(r) {
  return Number.isFinite(r) ? r.toFixed(2) : '-';
}

/** Bytes per millisecond as MB/s (10^6 bytes, as fio prints). */
function formatMBps(bytes, ms) {
  return Number.isFinite(ms) && ms > 0 ? `${((bytes / ms) * 1e3 / 1e6).toFixed(0)} MB/s` : '-';
}

/** Print rows (arrays of strings) under headers as an aligned text table. */
function printTable(headers, rows, out = process.stdout) {
  const cells = [headers, ...rows].map((r) => r.map((c) => String(c ?? '')));
  const widths = headers.map((_, i) => Math.max(...cells.map((r) => (r[i] ?? '').length)));
  const line = (r) => r.map((c, i) => (i === 0 ? c.padEnd(widths[i]) : c.padStart(widths[i]))).join('  ');
  out.write(line(cells[0]) + '\n');
  out.write(widths.map((w) => '-'.repeat(w)).join('  ') + '\n');
  for (const r of cells.slice(1)) out.write(line(r) + '\n');
}

/** Rows as a Markdown table (for bench/README.md). */
function markdownTable(headers, rows) {
  const esc = (c) => String(c ?? '').replace(/\|/g, '\\|');
  return [
    `| ${headers.map(esc).join(' | ')} |`,
    `|${headers.map(() => '---').join('|')}|`,
    ...rows.map((r) => `| ${r.map(esc).join(' | ')} |`),
  ].join('\n');
}

module.exports = { median, maximum, formatMs, formatKiB, formatBytes, formatCount, formatRatio, formatMBps, printTable, markdownTable };
