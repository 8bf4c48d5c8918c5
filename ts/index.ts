/** The public exports of the qcow2 package. */
export { ErrorCodes, Qcow2Error } from './errors.js';
export type { Qcow2ErrorCode } from './errors.js';
export type { Extent, ExtentKind, ExtentOptions, Image, ImageFormat, ReadStreamOptions, WriteZeroesOptions } from './image.js';
export { allocAligned } from './native.js';
export type { CacheMode } from './native.js';
export { open, probeFormat } from './open.js';
export type { OpenOptions } from './open.js';
export { RawImage } from './raw.js';
