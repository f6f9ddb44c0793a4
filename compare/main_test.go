package compare_test

import (
	"crypto"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"os"
	"sync"
	"testing"

	"github.com/ce46d8f2/hsm/internal/softhsmtest"
)

func TestMain(m *testing.M) { os.Exit(softhsmtest.Main(m)) }

var digest32 = sha256.Sum256([]byte("benchmark"))

var benchTok struct {
	sync.Mutex
	tok *softhsmtest.Token
}

// benchToken is a token with an EC P-256 key "ec" (id 01), an RSA-2048 key
// "rsa" (02) and an Ed25519 key "ed" (03).
func benchToken(t testing.TB) *softhsmtest.Token {
	t.Helper()
	benchTok.Lock()
	defer benchTok.Unlock()
	if benchTok.tok == nil {
		tok := softhsmtest.NewToken(t, "bench")
		tok.GenerateKey(t, softhsmtest.P256, []byte{1}, "ec")
		tok.GenerateKey(t, softhsmtest.RSA2048, []byte{2}, "rsa")
		tok.GenerateKey(t, softhsmtest.Ed25519, []byte{3}, "ed")
		benchTok.tok = tok
	}
	return benchTok.tok
}

// encryptTo encrypts secret to pub as a Decrypter with opts (nil, or
// *rsa.OAEPOptions) expects it.
func encryptTo(t testing.TB, pub *rsa.PublicKey, secret []byte, opts crypto.DecrypterOpts) []byte {
	t.Helper()
	var ct []byte
	var err error
	if o, ok := opts.(*rsa.OAEPOptions); ok {
		ct, err = rsa.EncryptOAEPWithOptions(rand.Reader, pub, secret, o)
	} else {
		//lint:ignore SA1019 crypto.Decrypter still defines PKCS #1 v1.5 decryption; the comparison needs its ciphertexts.
		ct, err = rsa.EncryptPKCS1v15(rand.Reader, pub, secret)
	}
	if err != nil {
		t.Fatal(err)
	}
	return ct
}
