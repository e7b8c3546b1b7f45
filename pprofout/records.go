package pprofout

import (
	"errors"
	"fmt"

	"google.golang.org/protobuf/encoding/protowire"
)

// Bounds on what a profile ReadFile accepts may hold, checked on the wire
// before it is parsed. A record costs far more parsed than encoded (an
// empty sample: 2 bytes encoded, ~160 parsed; a packed location id: 1 byte,
// 16 parsed), so MaxProfileBytes alone let a 250 KB file take 19 GiB.
// Real heap profiles hold well under a tenth of each.
const (
	// MaxProfileMessages bounds the messages (samples, mappings,
	// locations, functions, strings, labels, lines, ...): ~640 MiB parsed
	// at most.
	MaxProfileMessages = 1 << 22
	// MaxProfileValues bounds the packed numbers (location ids and values
	// of samples, comments): ~256 MiB parsed at most.
	MaxProfileValues = 1 << 24
)

// errTooManyRecords: a bound of checkRecords was passed.
var errTooManyRecords = errors.New("not read")

// checkRecords counts data's records (profile.proto: Profile, its samples
// and locations) without parsing them and fails once either bound is
// passed (errTooManyRecords), or on a malformed encoding.
func checkRecords(data []byte) error {
	var msgs, vals int
	over := func() error {
		if msgs > MaxProfileMessages {
			return fmt.Errorf("%w: it holds more than %d records (samples, locations, functions, strings, labels, lines)", errTooManyRecords, MaxProfileMessages)
		}
		if vals > MaxProfileValues {
			return fmt.Errorf("%w: it holds more than %d location ids and values", errTooManyRecords, MaxProfileValues)
		}
		return nil
	}
	return walkFields(data, func(num protowire.Number, typ protowire.Type, val []byte) error {
		msgs++
		var err error
		switch {
		case num == 2 && typ == protowire.BytesType: // Profile.sample
			err = walkFields(val, func(n protowire.Number, t protowire.Type, v []byte) error {
				switch {
				case (n == 1 || n == 2) && t == protowire.BytesType: // location_id, value (packed)
					vals += packedCount(v)
				case n == 1 || n == 2:
					vals++
				default: // label
					msgs++
				}
				return over()
			})
		case num == 4 && typ == protowire.BytesType: // Profile.location
			err = walkFields(val, func(n protowire.Number, _ protowire.Type, _ []byte) error {
				if n == 4 { // line
					msgs++
				}
				return over()
			})
		case num == 13 && typ == protowire.BytesType: // Profile.comment (packed)
			vals += packedCount(val)
		}
		if err != nil {
			return err
		}
		return over()
	})
}

// walkFields calls fn for each field of the message encoded in b, with its
// bytes for a length-delimited field (nil otherwise).
func walkFields(b []byte, fn func(protowire.Number, protowire.Type, []byte) error) error {
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 {
			return protowire.ParseError(n)
		}
		b = b[n:]
		m := protowire.ConsumeFieldValue(num, typ, b)
		if m < 0 {
			return protowire.ParseError(m)
		}
		var val []byte
		if typ == protowire.BytesType {
			val, _ = protowire.ConsumeBytes(b)
		}
		if err := fn(num, typ, val); err != nil {
			return err
		}
		b = b[m:]
	}
	return nil
}

// packedCount is the number of varints in a packed field: each ends with a
// byte below 0x80.
func packedCount(b []byte) int {
	n := 0
	for _, c := range b {
		if c < 0x80 {
			n++
		}
	}
	return n
}
