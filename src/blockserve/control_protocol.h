/* The control socket between the nbdkit plugin (nbdkit_plugin.c) and the
 * regdisk process that owns a lazily-pulled disk (export.h). The plugin
 * serves chunks whose bit is set in chunks.map straight from disk.raw; for
 * a read that touches a missing chunk it asks the owner to make the range
 * present, one request per connection:
 *
 *   plugin -> owner   16 bytes: offset (u64), length (u64), host byte order
 *   owner -> plugin    4 bytes: 0 when every chunk of the range is present
 *                     and verified, else an errno value (EIO) for the guest
 *
 * Both ends are on one machine and one user; the socket is 0600 in the
 * disk's directory. Plain C, shared by both sides. */
#ifndef REGDISK_BLOCKSERVE_CONTROL_PROTOCOL_H_
#define REGDISK_BLOCKSERVE_CONTROL_PROTOCOL_H_

#define REGDISK_CONTROL_REQUEST_BYTES 16
#define REGDISK_CONTROL_REPLY_BYTES 4

#endif
