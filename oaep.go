package hsm

import (
	"crypto"
	"crypto/subtle"
	"encoding/binary"
)

// Software OAEP decoding (RFC 8017 §7.1.2 step 3) for tokens whose
// CKM_RSA_PKCS_OAEP does not take the requested hash, MGF or label
// (SoftHSM 2.6 takes only SHA-1, MGF1-SHA1 and no label). The private-key
// operation still runs on the token, as CKM_RSA_X_509; only the padding is
// checked here. Every check runs in constant time with respect to the
// encoded message, the way crypto/rsa does it, so that a failure reveals
// nothing but the failure.

// oaepShape is what a token may or may not accept in CK_RSA_PKCS_OAEP_PARAMS.
type oaepShape struct {
	hash, mgf crypto.Hash
	label     bool
}

// unpadOAEP returns the message in the encoded message em (as long as the
// modulus) or false.
func unpadOAEP(em []byte, hash, mgfHash crypto.Hash, label []byte) ([]byte, bool) {
	hLen := hash.Size()
	if len(em) < 2*hLen+2 {
		return nil, false
	}
	h := hash.New()
	h.Write(label)
	lHash := h.Sum(nil)

	firstByteIsZero := subtle.ConstantTimeByteEq(em[0], 0)
	seed := em[1 : hLen+1]
	db := em[hLen+1:]
	mgf1XOR(seed, mgfHash, db)
	mgf1XOR(db, mgfHash, seed)
	lHashGood := subtle.ConstantTimeCompare(lHash, db[:hLen])

	// db = lHash' || PS (zeros) || 0x01 || M. Find the 0x01 without
	// branching on the data.
	rest := db[hLen:]
	lookingForIndex, index, invalid := 1, 0, 0
	for i, b := range rest {
		equals0 := subtle.ConstantTimeByteEq(b, 0)
		equals1 := subtle.ConstantTimeByteEq(b, 1)
		index = subtle.ConstantTimeSelect(lookingForIndex&equals1, i, index)
		lookingForIndex = subtle.ConstantTimeSelect(equals1, 0, lookingForIndex)
		invalid = subtle.ConstantTimeSelect(lookingForIndex&^equals0, 1, invalid)
	}
	if firstByteIsZero&lHashGood&^invalid&^lookingForIndex != 1 {
		return nil, false
	}
	return rest[index+1:], true
}

// mgf1XOR XORs out with MGF1(seed) using hash.
func mgf1XOR(out []byte, hash crypto.Hash, seed []byte) {
	h := hash.New()
	var counter [4]byte
	var digest []byte
	for done := 0; done < len(out); {
		h.Reset()
		h.Write(seed)
		h.Write(counter[:])
		digest = h.Sum(digest[:0])
		for i := 0; i < len(digest) && done < len(out); i++ {
			out[done] ^= digest[i]
			done++
		}
		binary.BigEndian.PutUint32(counter[:], binary.BigEndian.Uint32(counter[:])+1)
	}
}
