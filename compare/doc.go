// Package compare has no code of its own: its tests put hsm side by side
// with raw miekg/pkcs11 and crypto11 (github.com/ThalesGroup/crypto11
// v1.6.2) on the same SoftHSM2 keys, and show an hsm key signing a JWS
// through go-jose. It is a module of its own so that the core's go.mod
// requires neither crypto11 nor go-jose; make bench runs its benchmarks
// (scripts/bench.sh, scripts/instructions.sh).
//
//   - BenchmarkOps: every operation with every engine, serial and parallel,
//     directly on SoftHSM and through p11-kit remoting.
//   - BenchmarkScale: listing every key and looking one up as keys are
//     added to the token (HSM_SCALE).
//   - TestCallsCompared: the PKCS#11 calls of one signature and one
//     decryption in each engine, counted through OpenSC's pkcs11-spy.
//   - Example_jws: a JWS signed by an HSM key through go-jose.
package compare
