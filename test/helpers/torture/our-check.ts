/** The library's check(), in the terms the torture compares with qemu-img check. */
import { check } from '../../../ts/tools/check.js';
import type { OurCheck } from './lane.js';

/** check() of the library, and with `repair` its repair. */
export const libraryCheck: OurCheck = async (file, repair) => {
  const result = await check(file, repair ? { repair } : {});
  return { corruptions: result.corruptions, leaks: result.leaks, checkErrors: result.checkErrors };
};
