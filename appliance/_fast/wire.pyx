# cython: language_level=3
"""The NBD transmission phase's wire format (declarations in wire.pxd)."""


cpdef int nbd_errno(int e) noexcept nogil:
    """Map a host errno onto the few values the protocol carries."""
    if e == 0:
        return 0
    if e == 1 or e == 30:  # EPERM, EROFS
        return NBD_EPERM
    if e == 12:
        return NBD_ENOMEM
    if e == 22:
        return NBD_EINVAL
    if e == 28 or e == 122 or e == 27:  # ENOSPC, EDQUOT, EFBIG
        return NBD_ENOSPC
    if e == 75:
        return NBD_EOVERFLOW
    if e == 95:
        return NBD_ENOTSUP
    if e == 108:
        return NBD_ESHUTDOWN
    return NBD_EIO
