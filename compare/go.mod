module github.com/ce46d8f2/hsm/compare

go 1.26.0

require (
	github.com/ThalesGroup/crypto11 v1.6.2
	github.com/ce46d8f2/hsm v0.1.0
	github.com/go-jose/go-jose/v4 v4.1.9
	github.com/miekg/pkcs11 v1.1.2
)

require (
	github.com/pkg/errors v0.9.1 // indirect
	github.com/thales-e-security/pool v0.0.2 // indirect
	golang.org/x/sync v0.25.0 // indirect
)

replace github.com/ce46d8f2/hsm => ../
