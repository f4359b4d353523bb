/* The on-disk layout of a chunk bitmap (store/chunk_bitmap.h): which chunks
 * of a chunked disk are present and verified in its local file. Plain C, so
 * that the nbdkit plugin (src/blockserve/nbdkit_plugin.c) reads the same
 * layout the C++ side writes.
 *
 *   offset  size  field
 *        0    16  magic "regdisk-chunkmap"
 *       16     4  version (1), host byte order
 *       20     4  chunk_shift: chunks are 1 << chunk_shift bytes
 *       24     8  chunk count
 *       32    32  key: SHA-256 of the text "sha256:…" naming the chunk index
 *                 this bitmap belongs to (its digest in the layer annotation)
 *       64    40  boot id (/proc/sys/kernel/random/boot_id) of the writer
 *      104    24  reserved, zero
 *      128     *  bits: 64-bit words, bit k % 64 of word k / 64 is chunk k
 *
 * A set bit means: the chunk's bytes in the disk file were verified against
 * the index. Bits are only ever set by the writer, after the bytes are
 * written; readers load words atomically (acquire). */
#ifndef REGDISK_STORE_CHUNK_BITMAP_FORMAT_H_
#define REGDISK_STORE_CHUNK_BITMAP_FORMAT_H_

#define REGDISK_CHUNKMAP_MAGIC "regdisk-chunkmap"
#define REGDISK_CHUNKMAP_MAGIC_BYTES 16
#define REGDISK_CHUNKMAP_VERSION 1
#define REGDISK_CHUNKMAP_OFF_VERSION 16
#define REGDISK_CHUNKMAP_OFF_SHIFT 20
#define REGDISK_CHUNKMAP_OFF_COUNT 24
#define REGDISK_CHUNKMAP_OFF_KEY 32
#define REGDISK_CHUNKMAP_OFF_BOOT_ID 64
#define REGDISK_CHUNKMAP_BOOT_ID_BYTES 40
#define REGDISK_CHUNKMAP_HEADER_BYTES 128

#endif
