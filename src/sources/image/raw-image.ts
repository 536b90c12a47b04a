// A raw memory file (Firecracker's snapshot memory file): image byte k = file byte k.
// Zero pages come from the file's holes (SEEK_DATA/SEEK_HOLE); no page data is read.
import { ImageError, SyscallError } from "../../core/errors.ts";
import { Errno, errnoName, sl } from "../../core/ffi.ts";
import { checkImageSize, IMAGE_PAGE, MappedImage, ZeroMap, mapReadOnly, openRegularFile, type SnapshotImage } from "./snapshot-image.ts";

export function openRawImage(path: string, prefault = true): SnapshotImage {
  const { fd, size } = openRegularFile(path);
  try {
    if (size === 0) throw new ImageError(`${path}: image file is empty`, { path });
    checkImageSize(size, path, "image file of");
    const zero = findHoles(fd, size, path);
    const mapAddr = mapReadOnly(fd, size, 0, path, prefault);
    return new MappedImage({ format: "raw", path, size, zero, mapAddr, mapLen: size });
  } finally {
    // The mapping keeps the file alive; the fd is not needed any more.
    sl.sl_close(fd);
  }
}

/** A page is zero iff it lies entirely inside a hole; the partial last page counts when the hole reaches EOF. */
export function findHoles(fd: number, size: number, path: string): ZeroMap {
  const zero = ZeroMap.forSize(size);
  const out = new BigUint64Array(1);
  const markHole = (start: number, end: number) => {
    const first = Math.ceil(start / IMAGE_PAGE);
    const last = end >= size ? zero.pages : Math.floor(end / IMAGE_PAGE);
    if (last > first) zero.setZeroRange(first, last - first);
  };
  let off = 0;
  while (off < size) {
    let r = sl.sl_file_seek_data(fd, off, out);
    if (r === -Errno.ENXIO) {
      markHole(off, size); // no data from off to EOF
      break;
    }
    if (r < 0) return noHoles(r, zero, path);
    const data = Number(out[0]);
    if (data > off) markHole(off, Math.min(data, size));
    if (data >= size) break;
    r = sl.sl_file_seek_hole(fd, data, out);
    if (r < 0) return noHoles(r, zero, path);
    const hole = Number(out[0]);
    if (hole <= data) break; // should not happen; stop rather than loop
    off = hole;
  }
  return zero;
}

// Filesystems without SEEK_HOLE support report "no holes"; anything else is a real failure.
function noHoles(r: number, zero: ZeroMap, path: string): ZeroMap {
  const errno = -r;
  if (errno === Errno.EINVAL || errno === Errno.EOPNOTSUPP) return new ZeroMap(zero.pages);
  throw new SyscallError("lseek", errno, errnoName(errno), { path });
}
