package hsmjwt_test

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"fmt"
	"log"

	"github.com/ce46d8f2/hsm"
	"github.com/ce46d8f2/hsm/hsmjwt"
	"github.com/golang-jwt/jwt/v5"
)

// A JWT signed with any crypto.Signer, verified with plain jwt.Parse. The
// key here is in memory so that the example runs anywhere; Example_hsm
// signs with a key in an HSM, the same way.
func Example() {
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader) // or p.DurableSigner(ref)
	var signer crypto.Signer = key

	s, err := jwt.NewWithClaims(hsmjwt.ES256, jwt.MapClaims{"sub": "alice"}).SignedString(signer)
	if err != nil {
		log.Fatal(err)
	}
	token, err := jwt.Parse(s, func(*jwt.Token) (any, error) { return signer.Public(), nil },
		jwt.WithValidMethods([]string{"ES256"}))
	if err != nil {
		log.Fatal(err)
	}
	sub, _ := token.Claims.GetSubject()
	fmt.Println(token.Method.Alg(), sub)
	// Output: ES256 alice
}

// Signing with a key in an HSM: a DurableSigner keeps working across HSM
// outages. token.SignedString(signer) fails fast while the HSM is away;
// hsmjwt.SignedString waits, until ctx ends, for it to come back.
func Example_hsm() {
	p, err := hsm.Open(hsm.Config{Path: "/usr/lib/softhsm/libsofthsm2.so", TokenLabel: "prod", PIN: "1234"})
	if err != nil {
		log.Fatal(err)
	}
	defer p.Close()
	signer, err := p.DurableSigner(hsm.KeyRef{Label: "jwt"}) // an ECDSA P-256 key
	if err != nil {
		log.Fatal(err)
	}
	ctx := context.Background() // e.g. the request's context
	s, err := hsmjwt.SignedString(ctx, jwt.NewWithClaims(hsmjwt.ES256, jwt.MapClaims{"sub": "alice"}), signer)
	if err != nil {
		log.Fatal(err)
	}
	_, err = jwt.Parse(s, func(*jwt.Token) (any, error) { return signer.Public(), nil })
	fmt.Println(err)
}
