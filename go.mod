module github.com/ce46d8f2/hsm

go 1.26.0

require (
	github.com/miekg/pkcs11 v1.1.2
	golang.org/x/sync v0.25.0
)

require github.com/go-jose/go-jose/v4 v4.1.9

require go.uber.org/goleak v1.3.0
