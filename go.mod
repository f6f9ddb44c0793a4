module github.com/ce46d8f2/hsm

go 1.26.0

require (
	github.com/miekg/pkcs11 v1.1.2
	golang.org/x/sync v0.25.0
)
