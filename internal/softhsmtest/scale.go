package softhsmtest

import (
	"fmt"
	"os"
	"strconv"
	"strings"
	"sync"
	"testing"

	"github.com/miekg/pkcs11"
)

// ScaleSizes returns the token sizes of the benchmarks of lookups as keys
// are added (BenchmarkScale of the core and of the compare module): the
// numbers of keys in HSM_SCALE, comma-separated, default "100,1000". It
// fails t when HSM_SCALE does not parse.
func ScaleSizes(t testing.TB) []int {
	t.Helper()
	spec := os.Getenv("HSM_SCALE")
	if spec == "" {
		spec = "100,1000"
	}
	var sizes []int
	for f := range strings.SplitSeq(spec, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil || n < 1 {
			t.Fatalf("HSM_SCALE=%q: %q is not a number of keys", spec, f)
		}
		sizes = append(sizes, n)
	}
	return sizes
}

// ScaleLabel and ScaleID are the CKA_LABEL ("k00042") and CKA_ID ("00042")
// of the i-th key of a ScaleToken.
func ScaleLabel(i int) string { return fmt.Sprintf("k%05d", i) }

// ScaleID: see ScaleLabel.
func ScaleID(i int) []byte { return fmt.Appendf(nil, "%05d", i) }

var scaleTokens struct {
	sync.Mutex
	m map[int]*Token
}

// ScaleToken returns a token with n ECDSA P-256 key pairs, both halves of
// the i-th labelled ScaleLabel(i) with CKA_ID ScaleID(i), made once per
// process and n. Unlike the other tokens of this package, its keys are
// made in this process, through a miekg/pkcs11 context of its own that is
// finalized before ScaleToken returns (pkcs11-tool would take a process per
// key). Call it when no other context of this process has SoftHSM open.
func ScaleToken(t testing.TB, n int) *Token {
	t.Helper()
	scaleTokens.Lock()
	defer scaleTokens.Unlock()
	if tok := scaleTokens.m[n]; tok != nil {
		return tok
	}
	tok := NewToken(t, fmt.Sprintf("scale%d", n))
	ctx := pkcs11.New(SoftHSMModule)
	if ctx == nil {
		t.Fatalf("softhsmtest: cannot load %s", SoftHSMModule)
	}
	defer ctx.Destroy()
	if err := ctx.Initialize(); err != nil {
		t.Fatal(err)
	}
	defer ctx.Finalize()
	s := loginSession(t, ctx, tok)
	ecParams := []byte{0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07} // P-256
	mech := []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_EC_KEY_PAIR_GEN, nil)}
	for i := range n {
		id, label := ScaleID(i), ScaleLabel(i)
		pub := []*pkcs11.Attribute{
			pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true), pkcs11.NewAttribute(pkcs11.CKA_VERIFY, true),
			pkcs11.NewAttribute(pkcs11.CKA_EC_PARAMS, ecParams),
			pkcs11.NewAttribute(pkcs11.CKA_ID, id), pkcs11.NewAttribute(pkcs11.CKA_LABEL, label),
		}
		priv := []*pkcs11.Attribute{
			pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true), pkcs11.NewAttribute(pkcs11.CKA_SIGN, true),
			pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, true), pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, true),
			pkcs11.NewAttribute(pkcs11.CKA_ID, id), pkcs11.NewAttribute(pkcs11.CKA_LABEL, label),
		}
		if _, _, err := ctx.GenerateKeyPair(s, mech, pub, priv); err != nil {
			t.Fatalf("key %d of %d: %v", i, n, err)
		}
	}
	if scaleTokens.m == nil {
		scaleTokens.m = map[int]*Token{}
	}
	scaleTokens.m[n] = tok
	return tok
}

// loginSession opens a read-write session on tok through ctx, logged in
// as the user.
func loginSession(t testing.TB, ctx *pkcs11.Ctx, tok *Token) pkcs11.SessionHandle {
	t.Helper()
	slots, err := ctx.GetSlotList(true)
	if err != nil {
		t.Fatal(err)
	}
	for _, slot := range slots {
		if ti, err := ctx.GetTokenInfo(slot); err != nil || ti.Label != tok.Label {
			continue
		}
		s, err := ctx.OpenSession(slot, pkcs11.CKF_SERIAL_SESSION|pkcs11.CKF_RW_SESSION)
		if err != nil {
			t.Fatal(err)
		}
		if err := ctx.Login(s, pkcs11.CKU_USER, tok.PIN); err != nil {
			t.Fatal(err)
		}
		return s
	}
	t.Fatalf("softhsmtest: token %q not found", tok.Label)
	return 0
}
