module github.com/ce46d8f2/hsm/stepkms

go 1.26.0

require (
	github.com/ce46d8f2/hsm v0.1.0
	go.step.sm/crypto v0.77.1
)

require (
	filippo.io/edwards25519 v1.2.0 // indirect
	github.com/ThalesIgnite/crypto11 v1.2.5 // indirect
	github.com/miekg/pkcs11 v1.1.2 // indirect
	github.com/pkg/errors v0.9.1 // indirect
	github.com/thales-e-security/pool v0.0.2 // indirect
	golang.org/x/crypto v0.58.0 // indirect
	golang.org/x/sync v0.25.0 // indirect
	golang.org/x/sys v0.49.0 // indirect
	golang.org/x/term v0.47.0 // indirect
)

replace github.com/ce46d8f2/hsm => ../
