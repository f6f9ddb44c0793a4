package compare_test

import (
	"fmt"
	"log"

	"github.com/ce46d8f2/hsm"
	"github.com/ce46d8f2/hsm/internal/softhsmtest"
	jose "github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/cryptosigner"
)

// exampleConfig returns the Config of a SoftHSM2 token with an EC P-256 key
// labelled "jws". In an application the Config comes from its
// configuration.
func exampleConfig() hsm.Config {
	tok, err := softhsmtest.CreateToken("example")
	if err != nil {
		log.Fatal(err)
	}
	if err := tok.Generate(softhsmtest.P256, []byte{1}, "jws"); err != nil {
		log.Fatal(err)
	}
	return hsm.Config{Path: softhsmtest.SoftHSMModule, TokenLabel: tok.Label, PIN: tok.PIN}
}

// An HSM key signs a JWS (JWT) through go-jose's opaque signer.
func Example_jws() {
	p, err := hsm.Open(exampleConfig())
	if err != nil {
		log.Fatal(err)
	}
	defer p.Close()
	key, err := p.Signer(hsm.KeyRef{Label: "jws"})
	if err != nil {
		log.Fatal(err)
	}

	signer, err := jose.NewSigner(jose.SigningKey{Algorithm: jose.ES256, Key: cryptosigner.Opaque(key)}, nil)
	if err != nil {
		log.Fatal(err)
	}
	obj, err := signer.Sign([]byte(`{"sub":"alice","iss":"hsm.example"}`))
	if err != nil {
		log.Fatal(err)
	}
	compact, _ := obj.CompactSerialize()

	parsed, err := jose.ParseSignedCompact(compact, []jose.SignatureAlgorithm{jose.ES256})
	if err != nil {
		log.Fatal(err)
	}
	payload, err := parsed.Verify(key.Public())
	fmt.Println(string(payload), err)
	// Output: {"sub":"alice","iss":"hsm.example"} <nil>
}
