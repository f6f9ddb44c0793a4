package hsm

// #include <stdlib.h>
import "C"

import "unsafe"

// cString copies s into C memory, NUL-terminated, for a module that may
// keep the pointer beyond the call (CK_C_INITIALIZE_ARGS.pReserved). Free
// it with freeC once the module is finalized.
func cString(s string) unsafe.Pointer { return unsafe.Pointer(C.CString(s)) }

func freeC(p unsafe.Pointer) { C.free(p) }
