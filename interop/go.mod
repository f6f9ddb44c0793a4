module github.com/ce46d8f2/hsm/interop

go 1.26.0

require (
	github.com/ce46d8f2/hsm v0.1.0
	github.com/ce46d8f2/hsm/hsmjwt v0.1.0
	github.com/golang-jwt/jwt/v5 v5.3.1
)

require (
	github.com/miekg/pkcs11 v1.1.2 // indirect
	golang.org/x/sync v0.25.0 // indirect
)

replace (
	github.com/ce46d8f2/hsm => ../
	github.com/ce46d8f2/hsm/hsmjwt => ../hsmjwt
)
