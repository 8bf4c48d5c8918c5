/** The public exports of the qcow2 package. */
export { ErrorCodes, Qcow2Error } from './errors.js';
export type { Qcow2ErrorCode } from './errors.js';
export type { Extent, ExtentKind, ExtentOptions, Image, ImageFormat, ReadStreamOptions, WriteZeroesOptions } from './image.js';
export { allocAligned } from './native.js';
export type { CacheMode } from './native.js';
export { open, probeFormat } from './open.js';
export type { OpenOptions } from './open.js';
export { RawImage } from './raw.js';
export { Qcow2Image } from './qcow2/image.js';
export { openQcow2 } from './qcow2/open.js';
export { CompareError, compareImages } from './tools/compare.js';
export type { CompareOptions, CompareResult, CompareVerdict } from './tools/compare.js';
export { convert, copyImage } from './tools/convert.js';
export type { ConvertOptions, CopyOptions } from './tools/convert.js';
export { mapImage } from './tools/map.js';
export type { MapEntry, MapOptions } from './tools/map.js';
