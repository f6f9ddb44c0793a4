package compare_test

import (
	"testing"

	"github.com/ce46d8f2/hsm/internal/softhsmtest"
	"github.com/miekg/pkcs11"
)

// ckmEdDSA is CKM_EDDSA, which miekg/pkcs11 v1.1.2 does not name.
const ckmEdDSA = 0x1057

// rawP11 is bare miekg/pkcs11, the baseline of the comparisons: a context
// of its own, logged in on one session, and for operations one session per
// goroutine (kept in a pool so that each is used by one goroutine at a
// time).
type rawP11 struct {
	ctx   *pkcs11.Ctx
	slot  uint
	login pkcs11.SessionHandle
	idle  chan pkcs11.SessionHandle
	t     testing.TB
}

// openRaw initializes module and logs in to tok; close undoes it.
func openRaw(t testing.TB, module string, tok *softhsmtest.Token) *rawP11 {
	t.Helper()
	ctx := pkcs11.New(module)
	if ctx == nil {
		t.Fatalf("raw: cannot load %s", module)
	}
	if err := ctx.Initialize(); err != nil {
		t.Fatal(err)
	}
	r := &rawP11{ctx: ctx, t: t, idle: make(chan pkcs11.SessionHandle, 64)}
	slots, err := ctx.GetSlotList(true)
	if err != nil {
		t.Fatal(err)
	}
	found := false
	for _, s := range slots {
		if ti, err := ctx.GetTokenInfo(s); err == nil && ti.Label == tok.Label {
			r.slot, found = s, true
		}
	}
	if !found {
		t.Fatal("raw: token not found")
	}
	if r.login, err = ctx.OpenSession(r.slot, pkcs11.CKF_SERIAL_SESSION|pkcs11.CKF_RW_SESSION); err != nil {
		t.Fatal(err)
	}
	if err := ctx.Login(r.login, pkcs11.CKU_USER, tok.PIN); err != nil {
		t.Fatal(err)
	}
	return r
}

// find returns at most max objects matching tmpl: one find, three calls.
func (r *rawP11) find(tmpl []*pkcs11.Attribute, max int) []pkcs11.ObjectHandle {
	r.t.Helper()
	if err := r.ctx.FindObjectsInit(r.login, tmpl); err != nil {
		r.t.Fatal(err)
	}
	objs, _, err := r.ctx.FindObjects(r.login, max)
	if ferr := r.ctx.FindObjectsFinal(r.login); err == nil {
		err = ferr
	}
	if err != nil {
		r.t.Fatal(err)
	}
	return objs
}

// privateKey returns the private key labelled label.
func (r *rawP11) privateKey(label string) pkcs11.ObjectHandle {
	r.t.Helper()
	objs := r.find(privateKeyTemplate(label), 2)
	if len(objs) != 1 {
		r.t.Fatalf("raw: %d private keys labelled %q", len(objs), label)
	}
	return objs[0]
}

func privateKeyTemplate(label string) []*pkcs11.Attribute {
	return []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_PRIVATE_KEY),
		pkcs11.NewAttribute(pkcs11.CKA_LABEL, label),
	}
}

// session takes an idle session, or opens one.
func (r *rawP11) session() pkcs11.SessionHandle {
	select {
	case s := <-r.idle:
		return s
	default:
	}
	s, err := r.ctx.OpenSession(r.slot, pkcs11.CKF_SERIAL_SESSION|pkcs11.CKF_RW_SESSION)
	if err != nil {
		r.t.Error(err)
	}
	return s
}

// put returns a session taken with session.
func (r *rawP11) put(s pkcs11.SessionHandle) {
	select {
	case r.idle <- s:
	default:
		_ = r.ctx.CloseSession(s)
	}
}

func (r *rawP11) close() {
	_ = r.ctx.Finalize()
	r.ctx.Destroy()
}
