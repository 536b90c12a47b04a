// Adapts an opened snapshot image (raw or mapped-ram) to the handler table's backend interface.
import type { ImageBackend } from "../port.ts";
import type { SnapshotImage } from "./snapshot-image.ts";

export function imageBackend(image: SnapshotImage): ImageBackend {
  return {
    kind: "image",
    size: image.size,
    zero: image.zero,
    base: image.base,
    // Raw holes read as zeros; mapped-ram leaves whatever the file holds where the bitmap says zero.
    zeroBytesAreZero: image.format === "raw",
    description: image.format === "raw" ? `raw image ${image.path}` : `mapped-ram image ${image.path} block ${image.blockName}`,
  };
}
