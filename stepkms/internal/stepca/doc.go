// Package stepca tests stepkms inside a real step-ca: its test builds
// smallstep's step-ca (github.com/smallstep/certificates as released, from
// the module proxy, unpatched) with stepkms.Register() added (./cmd/step-ca),
// runs it on a SoftHSM token served through p11-kit, issues certificates
// through its HTTP API with a JWK provisioner, kills and restarts the HSM,
// and reloads the CA with SIGHUP. `make stepca` runs it.
//
// It is a module of its own so that neither the core nor stepkms depends on
// smallstep/certificates. The step-ca build is the costly part (minutes cold,
// seconds from GOCACHE): the test builds it without the race detector, with
// the flags of an ordinary build, so that the cache is reused.
package stepca
